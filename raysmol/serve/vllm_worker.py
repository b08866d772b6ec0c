"""Methods raysmol adds to vLLM's GPU/CPU workers (`worker_extension_cls`), reached by name through
`LLM.collective_rpc`. Imported inside vLLM's worker processes: keep it free of Ray and of raysmol state."""

from __future__ import annotations


class WorkerExtension:
    def raysmol_reload(self, path: str) -> None:
        """Reload all weights from a Hugging Face folder, in place.

        vLLM's in-place reload skips `lm_head` of a model with tied embeddings (the checkpoint has no such
        tensor), so on CPU the pre-packed GEMM it built from the old embedding stays in use: re-run the
        head's post-load step so it packs the new one (measured: without it, greedy output matches neither
        model). Harmless where nothing is packed.
        """
        self.model_runner.reload_weights(weights_path=path)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and head.weight is embed.weight and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
