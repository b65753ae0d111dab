"""Backends: the three exported components behind one small interface.

    encode_views(pixel_values [N, 3, tile + dino, tile]) -> [N, tokens_per_view, dim]
    embed(ids [L]) -> [L, dim]                 (ids may be the skip / start / end specials)
    forward(embeds [T, dim]) -> logits [vocab]  (appends T positions to the KV cache)
    truncate(length)                            (forget cache positions >= length)
    write_profile(path)                         (with profile=True: the runtime's own profile)

`OnnxBackend` needs only onnxruntime and numpy. `PteBackend` runs ExecuTorch's Python runtime,
whose pybindings take torch tensors: torch is imported when that backend is chosen, never before.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from sphinx_edge.config import SphinxConfig
from sphinx_edge.processes import memory_pinning_refused, native_output_silenced
from sphinx_edge.runtime.manifest import decoder_io_names


class OnnxBackend:
    name = "onnx"

    def __init__(self, export_dir: Path, files: dict[str, list[str]], config: SphinxConfig,
                 threads: int | None = None, *, profile: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle intra-op threads spin by default; between graph calls they then steal the cores from
        # our own numpy work (image preprocessing tripled on 2 cores; benchmarks/RESULTS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No arena: it kept the largest activations each graph ever made (the vision encoder's: 0.8 GB
        # for SPHINX-Tiny) for the life of the session, and freeing tensors as they die costs no
        # measurable time in vision, prefill or decode. Prepacking stays: without it the weights stay
        # memory-mapped (the same RSS once read) but a view takes 20-30 % longer
        # (benchmarks/RESULTS.md, "Memory of a full answer").
        options.enable_cpu_mem_arena = False
        self.threads = threads  # None: onnxruntime's default, one per physical core

        def session(name: str):
            return ort.InferenceSession(str(export_dir / files[name][0]), options, providers=["CPUExecutionProvider"])

        self.vision, self.embedding = session("vision_encoder"), session("token_embedding")
        if profile:  # the decoder's per-operator times (write_profile; benchmarks/profile.py)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="sphinx-edge-profile-")) / "decoder")
        self.decoder = session("decoder")
        llm = config.llm
        self.max_seq_len = llm.max_seq_len
        # The KV cache: one buffer per layer and kind, bound as both past and present, so
        # GroupQueryAttention appends the new keys in place (its shared-buffer mode, as
        # onnxruntime-genai runs it) instead of copying the whole cache into a new present per step.
        # Positions past `length` hold stale keys the mask never reaches; forward overwrites them.
        self._cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, llm.n_kv_heads, llm.max_seq_len, llm.head_dim),
                                                                 dtype=np.float32)) for _ in range(2 * llm.n_layers)]
        inputs, outputs = decoder_io_names(llm.n_layers)
        self._cache_names = list(zip(inputs[3:], outputs[1:]))
        self.length = 0

    def encode_views(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embedding.run(None, {"input_ids": np.asarray(ids, dtype=np.int64)[None]})[0][0]

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        T = embeds.shape[0]
        if self.length + T > self.max_seq_len:
            raise ValueError(f"the conversation ({self.length} + {T} tokens) exceeds the export's context "
                             f"({self.max_seq_len})")
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], dtype=np.float32))
        binding.bind_cpu_input("attention_mask", np.ones((1, self.length + T), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(self.length, self.length + T, dtype=np.int64)[None])
        binding.bind_output("logits")
        for (past, present), buffer in zip(self._cache_names, self._cache):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        self.decoder.run_with_iobinding(binding)
        self.length += T
        return binding.get_outputs()[0].numpy()[0, -1]

    def truncate(self, length: int) -> None:
        self.length = length

    def write_profile(self, path: Path) -> None:
        """The decoder's onnxruntime profile (JSON trace events) so far, to `path`; needs `profile`."""
        trace = Path(self.decoder.end_profiling())
        shutil.move(trace, path)
        trace.parent.rmdir()


def executorch_runtime():
    """ExecuTorch's runtime (its pybindings) with the kernels a .pte of ours calls: the LLM ops
    (llama::update_cache, llama::custom_sdpa) and the quantized ones (the int8 embedding table).

    Without the compiler stack: `portable_lib` imports one small module of `executorch.exir`, whose
    package imports torch._dynamo, inductor and the exporters (about 9 s, and most of a pte answer's
    wall time), so that module is loaded on its own. The kernels come from the libraries that
    `executorch.extension.llm.custom_ops.custom_ops` and `executorch.kernels.quantized` would load,
    without their AOT (inductor) registrations, which only exporting needs.
    """
    import sys
    import types

    import executorch
    import torch

    root = Path(executorch.__path__[0])
    stand_in = "executorch.exir" not in sys.modules
    if stand_in:  # an empty package object, so that only exir/_warnings.py runs
        package = types.ModuleType("executorch.exir")
        package.__path__ = [str(root / "exir")]
        sys.modules["executorch.exir"] = package
        executorch.exir = package
    try:
        from executorch.extension.pybindings import portable_lib
    finally:
        if stand_in:  # a later `import executorch.exir` (an export) loads the real package
            del sys.modules["executorch.exir"]
            del executorch.exir

    for folder, pattern in (("extension/llm/custom_ops", "*custom_ops_aot_lib.*"),
                            ("kernels/quantized", "*quantized_ops_aot_lib.*")):
        (library,) = (root / folder).glob(pattern)
        torch.ops.load_library(str(library))
    return portable_lib


class PteBackend:
    name = "pte"

    def __init__(self, export_dir: Path, files: dict[str, list[str]], config: SphinxConfig,
                 threads: int | None = None, *, profile: bool = False) -> None:
        import torch  # ExecuTorch's pybindings exchange torch tensors

        portable_lib = executorch_runtime()
        from executorch.runtime import Runtime

        with native_output_silenced():  # the threadpool's CPU-probing log lines
            if threads:
                # XNNPACK runs on ExecuTorch's own thread pool, not torch's: size that one.
                portable_lib._unsafe_reset_threadpool(threads)
            self.threads = portable_lib._threadpool_get_thread_count()
        self._torch = torch
        with memory_pinning_refused():  # the program's pages come in as the kernels read them
            self.program = Runtime.get().load_program(Path(export_dir) / files["program"][0], enable_etdump=profile)
            self.methods = {name: self.program.load_method(name)
                            for name in ("vision_encoder", "token_embedding", "text_decoder")}
        self.max_seq_len = config.llm.max_seq_len
        self.length = 0

    def _run(self, method: str, *inputs: np.ndarray) -> np.ndarray:
        return self.methods[method].execute([self._torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])[0].numpy()

    def encode_views(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run("vision_encoder", pixel_values.astype(np.float32, copy=False))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._run("token_embedding", np.asarray(ids, dtype=np.int64)[None])[0]

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        T = embeds.shape[0]
        positions = np.arange(self.length, self.length + T, dtype=np.int64)
        logits = self._run("text_decoder", embeds[None].astype(np.float32, copy=False), positions)
        self.length += T
        return logits.reshape(-1, logits.shape[-1])[-1]

    def truncate(self, length: int) -> None:
        # The static cache keeps stale slots past `length`; attention reads only up to the current
        # position (llama::custom_sdpa), and they are written again before they are read.
        self.length = length

    def write_profile(self, path: Path) -> None:
        """ExecuTorch's ETDump of every method run so far, to `path`; needs `profile`."""
        self.program.write_etdump_result_to_file(str(path), str(path) + ".debug")


BACKENDS = {"onnx": OnnxBackend, "pte": PteBackend}
