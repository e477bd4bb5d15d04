"""Image families: supervised classification and SimCLR on timm / torchvision models."""
