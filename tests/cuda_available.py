"""The GPU test modules' gate: ``NGPU = require_gpu()`` at the top of a module skips the whole
module, with the reason, where cupy or a CUDA GPU is missing (every CI machine)."""
import pytest


def require_gpu() -> int:
    """The number of CUDA devices cupy sees; skips the calling test module when there is none."""
    try:
        import cupy
        n, why = cupy.cuda.runtime.getDeviceCount(), "no CUDA device"
    except ImportError as e:
        n, why = 0, f"cupy is not installed (pip install 'pyccl[gpu]'): {e}"
    except Exception as e:  # noqa: BLE001 - no driver, no device: skip with the reason
        n, why = 0, f"CUDA is not usable here: {type(e).__name__}: {e}"
    if n < 1:
        pytest.skip(f"CUDA tests need a GPU and cupy: {why}", allow_module_level=True)
    return n
