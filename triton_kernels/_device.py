"""Launch on the arguments' GPU: Triton launches on the *current* CUDA device and stream, not on the device
the tensors live on, so a model on ``cuda:1`` while ``cuda:0`` is current would launch on the wrong GPU."""
import functools

import torch


def on_tensor_device(launcher):
    """Decorator for a launcher: make the CUDA device of its first tensor argument current for the call.

    Skipped while ``torch.compile`` traces (the compiled graph guards its own device) and when that
    device is current already (the common case: one ``current_device()`` query per launch)."""
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if (t is None or t.device.type != "cuda" or torch.compiler.is_compiling()
                or t.device.index == torch.cuda.current_device()):
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)
    return launch
