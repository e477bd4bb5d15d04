"""`python -m overture` (also `accelerate launch -m overture ...`)."""

from overture.cli import main

raise SystemExit(main())
