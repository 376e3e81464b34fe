"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: run GPU code on the `meta` device and fail at
the first operation that would make the host wait for the accelerator."""
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Operations whose result the host needs before it can go on: a value read back, or a size only the
# device knows.
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
          aten.masked_select.default}


class HostSyncs(TorchDispatchMode):
    """Raise at any host sync of code whose accelerator tensors are on `meta` (CPU tensors are the host's):

    - a value of a device tensor read on the host (`.item()`, `float()`, `bool()`, `.tolist()`), or an op
      whose output size depends on device values (`nonzero`, boolean masks, `unique`);
    - a copy from the device to the host;
    - a copy from the host to the device that is not `non_blocking` (from pinned memory on a GPU such a
      copy is queued; without it the host waits for the device's queue to drain).

    A meta tensor has no values, so a read would fail anyway; this names the operation and the line.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = self._sync(func, args, kwargs)
        if why:
            here = "".join(traceback.format_list([f for f in traceback.extract_stack()
                                                  if "scdd_ray" in f.filename][-3:]))
            raise AssertionError(f"host sync: {why}\n{here}")
        return func(*args, **kwargs)

    @staticmethod
    def _sync(func, args, kwargs) -> str | None:
        if func in _READS and args[0].device.type != "cpu":
            return f"{func} reads a device value"
        if func is aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device") or args[0].device
            return HostSyncs._copy(func, src, torch.device(dst), kwargs.get("non_blocking", False))
        if func is aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            return HostSyncs._copy(func, args[1].device, args[0].device, non_blocking)
        return None

    @staticmethod
    def _copy(func, src: torch.device, dst: torch.device, non_blocking: bool) -> str | None:
        if src == dst:
            return None
        if dst.type == "cpu":
            return f"{func} copies a device tensor to the host"
        if src.type == "cpu" and not non_blocking:
            return f"{func} copies to the device without non_blocking"
        return None
