"""Peer runtimes on our LLM's exact shape: llama.cpp (llama-cpp-python, GGUF Q4_0 and Q8_0) and
onnxruntime-genai (int4), timed llama-bench style (ppN prompt tokens/s, tgN generated tokens/s).

The peers' models are written here, from one set of random weights (normal, std 0.02, seeded per
tensor), so every peer runs the same LLaMA: the GGUF files with gguf-py's own Q4_0 / Q8_0
quantizers, the onnxruntime-genai model with its builder (int4, CPU) from a Hugging Face folder
written first. They are cached by shape under `work_dir`, so a second run starts at the timing.

Each peer runs in its own process (`python -m sphinx_edge.benchmarks.peers SPEC_JSON`), like the
export cases, so its peak memory is its own. Needs the optional extra: pip install 'sphinx-edge[peers]'.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sphinx_edge.benchmarks.stages import summary
from sphinx_edge.rss import peak_rss_mib
from sphinx_edge.config import LLMConfig
from sphinx_edge.errors import UserError

# name -> (runtime, quantization)
PEERS = {"llama.cpp-Q4_0": ("llama.cpp", "Q4_0"), "llama.cpp-Q8_0": ("llama.cpp", "Q8_0"),
         "ort-genai-int4": ("onnxruntime-genai", "int4")}
PACKAGES = {"llama.cpp": ("llama_cpp", "llama-cpp-python"), "onnxruntime-genai": ("onnxruntime_genai", "onnxruntime-genai")}


class PeerUnavailable(UserError, RuntimeError):
    """The peer's package is not installed."""


def check_peer(peer: str) -> None:
    import importlib.util

    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    module, dist = PACKAGES[PEERS[peer][0]]
    if importlib.util.find_spec(module) is None:
        raise PeerUnavailable(f"{dist} is not installed: pip install 'sphinx-edge[peers]'")


# --- One set of random LLaMA weights ------------------------------------------------------------


def llama_shapes(llm: LLMConfig) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(Hugging Face name, GGUF name, shape) of every tensor of a LLaMA of `llm`'s shape."""
    head = llm.dim // llm.n_heads
    yield "model.embed_tokens.weight", "token_embd.weight", (llm.vocab_size, llm.dim)
    for i in range(llm.n_layers):
        hf, gg = f"model.layers.{i}", f"blk.{i}"
        yield f"{hf}.self_attn.q_proj.weight", f"{gg}.attn_q.weight", (llm.n_heads * head, llm.dim)
        yield f"{hf}.self_attn.k_proj.weight", f"{gg}.attn_k.weight", (llm.n_kv_heads * head, llm.dim)
        yield f"{hf}.self_attn.v_proj.weight", f"{gg}.attn_v.weight", (llm.n_kv_heads * head, llm.dim)
        yield f"{hf}.self_attn.o_proj.weight", f"{gg}.attn_output.weight", (llm.dim, llm.n_heads * head)
        yield f"{hf}.mlp.gate_proj.weight", f"{gg}.ffn_gate.weight", (llm.ffn_dim, llm.dim)
        yield f"{hf}.mlp.up_proj.weight", f"{gg}.ffn_up.weight", (llm.ffn_dim, llm.dim)
        yield f"{hf}.mlp.down_proj.weight", f"{gg}.ffn_down.weight", (llm.dim, llm.ffn_dim)
        yield f"{hf}.input_layernorm.weight", f"{gg}.attn_norm.weight", (llm.dim,)
        yield f"{hf}.post_attention_layernorm.weight", f"{gg}.ffn_norm.weight", (llm.dim,)
    yield "model.norm.weight", "output_norm.weight", (llm.dim,)
    yield "lm_head.weight", "output.weight", (llm.vocab_size, llm.dim)


def llama_tensors(llm: LLMConfig, seed: int = 0) -> Iterator[tuple[str, str, np.ndarray]]:
    """(Hugging Face name, GGUF name, float32 array) per tensor, drawn one at a time (a 1.1 B model
    is 4.4 GB in fp32): matrices normal with std 0.02, seeded by name; norms ones."""
    for hf, gg, shape in llama_shapes(llm):
        if len(shape) == 1:
            yield hf, gg, np.ones(shape, np.float32)
            continue
        digest = hashlib.sha256(f"{seed}/{hf}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        yield hf, gg, rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def _vocab(size: int) -> tuple[list[str], list[int]]:
    """A SentencePiece-style vocabulary llama.cpp accepts: unk, bos, eos, the 256 byte pieces, fillers."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, control, byte
    tokens += [f"\u2581t{i}" for i in range(size - len(tokens))]
    return tokens, types + [1] * (size - len(types))


# --- llama.cpp -----------------------------------------------------------------------------------


def write_gguf(llm: LLMConfig, path: Path, qtype: str, seed: int = 0) -> Path:
    """A GGUF LLaMA with every matrix in `qtype` (Q4_0 or Q8_0) and fp32 norms; written atomically."""
    import gguf

    quant = getattr(gguf.GGMLQuantizationType, qtype)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_context_length(llm.max_seq_len)
    writer.add_embedding_length(llm.dim)
    writer.add_block_count(llm.n_layers)
    writer.add_feed_forward_length(llm.ffn_dim)
    writer.add_rope_dimension_count(llm.dim // llm.n_heads)
    writer.add_head_count(llm.n_heads)
    writer.add_head_count_kv(llm.n_kv_heads)
    writer.add_layer_norm_rms_eps(llm.norm_eps)
    writer.add_rope_freq_base(llm.rope_theta)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    tokens, types = _vocab(llm.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for _, name, array in llama_tensors(llm, seed):
        if array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def time_llama_cpp(path: Path, pp: int, tg: int, warmup: int, repeats: int, threads: int | None) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=pp + tg + 8, n_batch=max(pp, 8), n_threads=threads, n_threads_batch=threads,
                verbose=False)
    # Fixed token ids, as llama-bench does: with random weights the tokens mean nothing, and
    # sampling is not what is measured.
    prompt, generated = np.split(np.random.default_rng(0).integers(259, llm.n_vocab(), pp + tg), [pp])

    used = {"threads": llm.n_threads, "threads_batch": llm.n_threads_batch}

    def once() -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt.tolist())
        t_pp = time.perf_counter() - t
        t = time.perf_counter()
        for token in generated.tolist():
            llm.eval([token])
        return pp / t_pp, tg / (time.perf_counter() - t)

    return {**used, **_repeat(once, warmup, repeats)}


# --- onnxruntime-genai -------------------------------------------------------------------------------


def write_hf_llama(llm: LLMConfig, out: Path, seed: int = 0) -> Path:
    """A Hugging Face LLaMA folder (config.json + fp16 safetensors) of the same weights."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": llm.dim,
              "intermediate_size": llm.ffn_dim, "num_hidden_layers": llm.n_layers,
              "num_attention_heads": llm.n_heads, "num_key_value_heads": llm.n_kv_heads,
              "vocab_size": llm.vocab_size, "max_position_embeddings": llm.max_seq_len,
              "rms_norm_eps": llm.norm_eps, "rope_theta": llm.rope_theta, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    _write_hf_tokenizer(llm.vocab_size, out)  # the builder reads one; the benchmark feeds token ids
    save_file({hf: a.astype(np.float16) for hf, _, a in llama_tensors(llm, seed)}, str(out / "model.safetensors"))
    return out


def _write_hf_tokenizer(vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_vocab(vocab_size)[0])}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))


def build_genai_int4(hf_dir: Path, out: Path) -> Path:
    """onnxruntime-genai's own builder: int4 weights for the CPU execution provider."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    tmp, cache = out.with_name(f".{out.name}.tmp"), str(out.parent / ".builder-cache")
    args = ("llama", str(hf_dir), str(tmp), "int4", "cpu", cache)
    create_model(*args, **parse_extra_options(*args, []))
    tmp.replace(out)
    return out


def time_genai(model_dir: Path, pp: int, tg: int, warmup: int, repeats: int, threads: int | None) -> dict:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if threads:  # intra-op threads as ours; one inter-op thread, as our own sessions have
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(259, vocab, pp).astype(np.int32)

    def once() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=pp + tg + 1, min_length=pp + tg + 1)  # no early stop at EOS
        generator = og.Generator(model, params)
        t = time.perf_counter()
        generator.append_tokens(prompt)  # runs the prompt through the model
        t_pp = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(tg):
            generator.generate_next_token()
        return pp / t_pp, tg / (time.perf_counter() - t)

    return {"threads": threads, **_repeat(once, warmup, repeats)}


# --- Shared -----------------------------------------------------------------------------------------


def _repeat(once: Callable[[], tuple[float, float]], warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        once()
    runs = [once() for _ in range(repeats)]
    return {"pp_tok_s": summary([r[0] for r in runs]), "tg_tok_s": summary([r[1] for r in runs])}


def shape_key(llm: LLMConfig) -> str:
    return f"llama-{llm.dim}x{llm.n_layers}-h{llm.n_heads}kv{llm.n_kv_heads}-f{llm.ffn_dim}-v{llm.vocab_size}"


def prepare(peer: str, llm: LLMConfig, work_dir: Path) -> Path:
    """The peer's model for `llm`'s shape, written on first use and cached in `work_dir`."""
    root = work_dir / shape_key(llm)
    root.mkdir(parents=True, exist_ok=True)
    runtime, qtype = PEERS[peer]
    if runtime == "llama.cpp":
        path = root / f"model-{qtype}.gguf"
        return path if path.exists() else write_gguf(llm, path, qtype)
    out = root / "genai-int4"
    if not out.exists():
        hf = root / "hf"
        if not (hf / "model.safetensors").exists():
            write_hf_llama(llm, hf)
        build_genai_int4(hf, out)
    return out


def run_peer(peer: str, llm: LLMConfig, work_dir: Path, pp: int, tg: int, warmup: int, repeats: int,
             threads: int | None) -> dict:
    check_peer(peer)
    model = prepare(peer, llm, work_dir)
    timer = time_llama_cpp if PEERS[peer][0] == "llama.cpp" else time_genai
    figures = timer(model, pp, tg, warmup, repeats, threads)
    size = sum(f.stat().st_size for f in ([model] if model.is_file() else model.rglob("*")) if f.is_file())
    return {"peer": peer, "shape": shape_key(llm), "pp_tokens": pp, "tg_tokens": tg, **figures,
            "artifact_bytes": size, "peak_rss_mib": peak_rss_mib()}


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    result = run_peer(spec["peer"], LLMConfig(**spec["llm"]), Path(spec["work_dir"]), spec["pp"], spec["tg"],
                      spec["warmup"], spec["repeats"], spec.get("threads"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
