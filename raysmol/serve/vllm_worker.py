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
        self._raysmol_repack_tied_head()

    # In-memory updates, bucket by bucket: vLLM's own layerwise reload (what `reload_weights` and the weight
    # transfer engines' start/update/finish_weight_update run), split across calls. `begin` puts every layer in
    # deferred mode; each bucket's `load_weights` buffers its tensors and a layer is processed (CPU: its linear
    # weights repacked for the GEMM kernels) as soon as all its weights are in; `end` processes the rest and
    # puts back the kernel tensors of layers that got nothing. A plain `model.load_weights` on a loaded model
    # skips that post-load processing: on CPU the old packed weights stay in use.

    def raysmol_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        if getattr(self, "_raysmol_updating", False):
            self.raysmol_end_update()  # an update left half done (its caller timed out): close it first
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._raysmol_updating, self._raysmol_loaded = True, 0

    def raysmol_load_bucket(self, names: list[str], path: str) -> int:
        """One bucket: a safetensors file (in shared memory, written by the engine's actor), loaded in the order
        of `names`."""
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config

        if not getattr(self, "_raysmol_updating", False):
            raise RuntimeError("raysmol_load_bucket without raysmol_begin_update")
        tensors = load_file(path)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights((n, tensors[n]) for n in names)
        self._raysmol_loaded += len(names)
        return self._raysmol_loaded

    def raysmol_end_update(self) -> int:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        if not getattr(self, "_raysmol_updating", False):
            raise RuntimeError("raysmol_end_update without raysmol_begin_update")
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        self._raysmol_updating = False
        runner = self.model_runner
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as reload_weights does
            if hasattr(runner, reset):
                getattr(runner, reset)()
        self._raysmol_repack_tied_head()
        return self._raysmol_loaded

    def _raysmol_repack_tied_head(self) -> None:
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and head.weight is embed.weight and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
