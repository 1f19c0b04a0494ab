import pytest


def gpu_skip_reason():
    """Why GPU tests cannot run here, or None when they can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (run the GPU tests on an H100/H200: see README)"
    from cute_mla import launcher
    try:
        arch = launcher.arch_for_device(torch.cuda.current_device())
    except launcher.UnsupportedDevice as e:
        return str(e)
    if not (launcher.cubin_dir() / arch / "manifest.json").exists():
        return f"no {arch} cubins at {launcher.cubin_dir()}: run `python -m cute_mla.compile` first"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            if reason is None:
                reason = gpu_skip_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
