"""Image models by name from timm or torchvision, their pooled features, a new classifier
head, and final/ in each library's own format.

``model.name`` is a timm name (``resnet50``, ``vit_small_patch16_224``), or
``torchvision:NAME`` for ``torchvision.models.get_model(NAME)``. final/ holds
``model.safetensors`` and ``config.json``:
  - timm: the file ``timm.models.save_for_hf`` writes (architecture, num_classes,
    model_args, label_names, pretrained_cfg), so ``timm.create_model("local-dir:DIR")``
    loads it without overture;
  - torchvision: {"library": "torchvision", "architecture", "num_classes",
    "model_args", ...}: ``torchvision.models.get_model(architecture, num_classes=...,
    **model_args)`` then ``load_state_dict`` (a SimCLR backbone: its classifier is
    ``torch.nn.Identity``, ``"head": "identity"``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from overture.config import ConfigError

LIBRARIES = ("timm", "torchvision")


def split_name(name: str) -> tuple[str, str]:
    """("timm" | "torchvision", architecture) of ``model.name``."""
    library, sep, arch = name.partition(":")
    if sep and library in LIBRARIES:
        return library, arch
    return "timm", name


def sized_args(name: str, args: dict, image_size: int) -> dict:
    """``args`` plus the input size for models built for one size (timm ViTs and the
    like: ``img_size``; torchvision ViTs: ``image_size``), unless ``args`` sets it; and
    torchvision's GoogLeNet / Inception without auxiliary classifiers (one output)."""
    library, arch = split_name(name)
    args = dict(args)
    if library == "timm":
        import timm

        if "img_size" not in args and timm.is_model(arch) and _takes_img_size(arch):
            args["img_size"] = image_size
    elif arch.startswith("vit_"):
        args.setdefault("image_size", image_size)
    elif arch in ("googlenet", "inception_v3"):
        args.setdefault("aux_logits", False)
        args.setdefault("init_weights", True)
    return args


def create(name: str, num_classes: int, args: dict | None = None) -> nn.Module:
    """A freshly initialised model; ``num_classes=0``: no classifier (pooled features).
    The current torch default device applies (the meta device for size estimates)."""
    library, arch = split_name(name)
    args = dict(args or {})
    try:
        if library == "timm":
            import timm

            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)
        import torchvision

        model = torchvision.models.get_model(arch, weights=None,
                                             num_classes=max(num_classes, 1), **args)
        if num_classes == 0:
            set_head(model, 0)
        return model
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.name={name!r} with model.args={args}: {library} cannot "
                          f"build it ({message})") from None


@functools.lru_cache(maxsize=None)
def _takes_img_size(arch: str) -> bool:
    """True when the class of timm model ``arch`` accepts ``img_size`` (ViTs and the
    like); its entrypoint is built once on the meta device to find the class."""
    import inspect

    import timm

    try:
        with torch.device("meta"):
            model = timm.models.model_entrypoint(arch)(pretrained=False)
    except Exception:  # noqa: BLE001  (an entrypoint that needs arguments)
        return False
    return "img_size" in inspect.signature(type(model).__init__).parameters


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The torchvision classifier: the last nn.Linear (fc, classifier[-1], heads.head)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to replace")
    path, layer = found[-1]
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path) if parent_path else model, attr, layer


def set_head(model: nn.Module, num_classes: int) -> None:
    """A new, freshly initialised classifier for ``num_classes`` (0: identity, pooled
    features out), in timm's way (``reset_classifier``) or torchvision's (last Linear)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    if getattr(model, "overture_identity_head", False):  # a backbone: the width is known
        width = model.overture_num_features
        parent, attr = model.overture_head_at
    else:
        parent, attr, layer = _last_linear(model)
        width = layer.in_features
    new = nn.Identity() if num_classes == 0 else nn.Linear(width, num_classes)
    setattr(parent, attr, new)
    # torchvision models keep no record of their feature width once the head is gone
    model.overture_identity_head, model.overture_num_features = num_classes == 0, width
    model.overture_head_at = (parent, attr)


def classifier_parameters(model: nn.Module) -> set[int]:
    """ids of the classifier head's parameters (what transfer trains while the backbone
    is frozen)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    elif getattr(model, "overture_head_at", None):
        parent, attr = model.overture_head_at
        head = getattr(parent, attr)
    else:
        parent, attr, _ = _last_linear(model)
        head = getattr(parent, attr)
    return {id(p) for p in head.parameters()}


def num_features(model: nn.Module) -> int:
    """Width of the pooled features (the classifier's input)."""
    if hasattr(model, "head_hidden_size"):  # timm: differs from num_features (MobileNetV3)
        return int(model.head_hidden_size)
    if hasattr(model, "num_features"):
        return int(model.num_features)
    if hasattr(model, "overture_num_features"):
        return int(model.overture_num_features)
    return _last_linear(model)[2].in_features


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, num_features]: the pooled features before the classifier (timm's
    ``forward_head(pre_logits=True)``; torchvision's with the classifier bypassed)."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if getattr(model, "overture_identity_head", False):
        return model(images)
    parent, attr, _ = (model.overture_head_at + (None,) if getattr(model, "overture_head_at", None)
                       else _last_linear(model))
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        return model(images)
    finally:
        setattr(parent, attr, head)


# --------------------------------------------------------------------------- final/


def export(model: nn.Module, state: dict, folder: Path, name: str, args: dict,
           num_classes: int, class_names: list[str], image_size: int, mean, std,
           crop_pct: float, interpolation: str) -> None:
    """final/ in the model library's format (see the module docstring)."""
    from safetensors.torch import save_file

    library, arch = split_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    labels = class_names if num_classes and len(class_names) == num_classes else None
    data_config = {"input_size": [3, image_size, image_size], "mean": list(mean),
                   "std": list(std), "crop_pct": crop_pct, "interpolation": interpolation}
    save_file(state, str(folder / "model.safetensors"))
    if library == "timm":
        # the config.json of timm's save_for_hf (whose weights file is the one above)
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, folder / "config.json", model_config={"label_names": labels,
                                                        "pretrained_cfg": {"tag": "overture"}},
                           model_args=_jsonable(args) or None, data_config=data_config)
        config = json.loads((folder / "config.json").read_text())
    else:
        parent, attr = getattr(model, "overture_head_at", None) or _last_linear(model)[:2]
        head = next(n for n, m in model.named_modules() if m is parent)
        config = {"library": "torchvision", "architecture": arch, "num_classes": num_classes,
                  "head": "linear" if num_classes else "identity",
                  # where the classifier is (an Identity in a backbone): fc, classifier.3, ...
                  "head_module": f"{head}.{attr}" if head else attr,
                  "model_args": _jsonable(args), "label_names": labels,
                  "num_features": num_features(model), "pretrained_cfg": data_config}
    config["overture"] = {"model.name": name}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _jsonable(args: dict) -> dict:
    return json.loads(json.dumps(args or {}))


def final_folder(path: Path) -> Path:
    """``path``, or its final/ when it is a run folder holding one."""
    path = Path(path).expanduser()
    return path / "final" if (path / "final" / "config.json").is_file() else path


def is_image_checkpoint(folder: Path) -> bool:
    """True for a folder whose config.json is a timm / torchvision image model's."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return False
    return "architecture" in data and "model_type" not in data


def checkpoint_architecture(folder: Path) -> tuple[str, dict]:
    """(model name as overture spells it, constructor arguments) of an image folder."""
    config = json.loads((Path(folder) / "config.json").read_text())
    library = config.get("library", "timm")
    name = config.get("overture", {}).get("model.name") or (
        config["architecture"] if library == "timm" else f"torchvision:{config['architecture']}")
    args = dict(config.get("model_args") or {})
    args.pop("num_classes", None)  # timm records it there too; the caller chooses it
    return name, args


def load(folder: Path, num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """(model, config.json) of an image final/ folder, with its weights; ``num_classes``
    replaces the classifier with a new one (transfer), 0 removes it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    name, args = checkpoint_architecture(folder)
    model = create(name, config.get("num_classes", 0), args)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder}: no model.safetensors")
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise ConfigError(f"{weights} does not fit {name} "
                          f"({str(err).strip().splitlines()[-1].strip()})") from None
    if num_classes is not None and num_classes != config.get("num_classes", 0):
        set_head(model, num_classes)
    return model, config


def load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    """Weights of ``model.name``'s architecture from a local .safetensors / .pth / .bin
    file (a timm or torchvision release); a classifier of another size is skipped (the
    new head stays freshly initialised)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001  (corrupt file, pickle refused, ...)
        raise ConfigError(f"model.init_from={str(path)!r} is not a readable .safetensors / "
                          f".pth / .bin weights file ({type(err).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept]
    head = {n for n, p in model.named_parameters() if id(p) in classifier_parameters(model)}
    if not kept or [k for k in missing if k not in head and not k.endswith("num_batches_tracked")]:
        shown = [k for k in missing if k not in head][:3]
        raise ConfigError(f"model.init_from={str(path)!r} does not fit model.name={name!r}: "
                          f"{len(missing)} weights missing or of another shape "
                          f"(e.g. {', '.join(shown)})")
    model.load_state_dict(kept, strict=False)
