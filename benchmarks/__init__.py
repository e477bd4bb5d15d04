"""Side-by-side measurements against the tools users would pick instead (run by hand,
never part of the test run): ``python -m benchmarks`` runs the suite."""
