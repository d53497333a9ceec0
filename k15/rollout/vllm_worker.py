"""The vLLM worker extension: weight loading and the weight broadcast inside vLLM's workers.

VllmEngine names this class in the engine argument worker_extension_cls; vLLM mixes it into its GPU
worker (vllm/v1/worker/worker_base.py), so `self` is the worker: `self.device` is its GPU and
`self.model_runner.get_model()` its model (the unwrapped module, also under CUDA graphs). The
engine calls these methods through `LLM.collective_rpc("k15_...")`, on every worker at once.

The model's `load_weights` takes Hugging Face names and whole tensors: it maps them onto vLLM's
fused parameters (q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj), copies, and keeps this
worker's tensor-parallel shard. So every worker receives the whole model, as the trainer names it.

vLLM refuses an extension attribute that its worker already has, hence the k15_ prefixes.
"""

from __future__ import annotations

import torch


class WeightSyncExtension:
    def k15_device(self) -> str:
        return str(self.device)

    def k15_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy (Hugging Face name, tensor) pairs into the live parameters."""
        # vLLM may decode on a stream of its own: nothing may still read the old values, and the
        # next step must see the new ones.
        torch.cuda.synchronize(self.device)
        with torch.no_grad():
            self.model_runner.get_model().load_weights(weights=named_tensors)
        torch.cuda.synchronize(self.device)

    def k15_join_weight_group(self, info, rank: int, bucket_bytes: int) -> None:
        """Join the trainer's weight broadcast as rank `rank` + this worker's tensor-parallel rank: an
        engine of tensor-parallel size n takes the n ranks from `rank` on (the caller sizes the group
        for that). NcclGroupInfo gives an NcclWeightReceiver on this worker's GPU; the colocated
        (CUDA IPC) and gloo groups work the same way (k15.sync.make_receiver). A new group replaces
        an old one."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from k15.sync import make_receiver

        self.k15_leave_weight_group()
        self._k15_receiver = make_receiver(info, rank + get_tensor_model_parallel_rank(), bucket_bytes, self.device)

    def k15_receive_weights(self, meta: list[tuple[str, tuple[int, ...], str]]) -> int:
        """Take part in one broadcast, loading each bucket into the live parameters as it lands
        (load_weights copies out of the staging buffer, which the receiver reuses). Returns the bytes
        received."""
        receiver = getattr(self, "_k15_receiver", None)
        if receiver is None:
            raise RuntimeError("k15_receive_weights before k15_join_weight_group")
        model = self.model_runner.get_model()
        torch.cuda.synchronize(self.device)  # the last decoding step may still read the parameters
        with torch.no_grad():
            return receiver.receive(meta, load=lambda named: model.load_weights(weights=named))

    def k15_weights_checksum(self) -> dict[str, float]:
        """Float64 sum of each of this worker's parameters (vLLM's names and shards), for tests."""
        return {name: p.detach().double().sum().item() for name, p in self.model_runner.get_model().named_parameters()}

    def k15_leave_weight_group(self) -> None:
        receiver = getattr(self, "_k15_receiver", None)
        if receiver is not None:
            receiver.close()
        self._k15_receiver = None

    def destroy_worker_extension(self) -> None:
        """vLLM's hook at worker shutdown."""
        self.k15_leave_weight_group()
