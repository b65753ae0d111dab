"""Peer runtimes: their models have exactly our LLM's shape; they run where installed (skipped with the reason where not)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import missing_tool
from sphinx_edge.benchmarks.peers import (PEERS, PeerUnavailable, check_peer, llama_shapes, llama_tensors,
                                          prepare, run_peer)
from sphinx_edge.benchmarks.report import peer_table
from sphinx_edge.config import LLMConfig, get_config, parameter_counts

SMALL = LLMConfig("llama", 64, 2, 4, 2, 128, 512, max_seq_len=256)


def needs(*modules: tuple[str, str]):
    """The peers extra that `make deps` installs: skip without it on a developer's machine, fail under CI."""
    for module, dist in modules:
        if importlib.util.find_spec(module) is None:
            missing_tool(f"{dist} is not installed (bash benchmarks/install-peers.sh, or make deps)")


@pytest.mark.parametrize("size", ["tiny", "nano", "intern2"])
def test_the_peer_llama_has_exactly_our_llm_parameter_count(size):
    count = sum(int(np.prod(shape)) for _, _, shape in llama_shapes(get_config(size).llm))
    assert count == parameter_counts(get_config(size))["llm"]


def test_weights_are_seeded_per_tensor():
    a = {hf: x for hf, _, x in llama_tensors(SMALL, seed=3)}
    b = {hf: x for hf, _, x in llama_tensors(SMALL, seed=3)}
    c = {hf: x for hf, _, x in llama_tensors(SMALL, seed=4)}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["lm_head.weight"], c["lm_head.weight"])


def test_unknown_or_missing_peers_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="unknown peer"):
        check_peer("llama.cpp-Q2_K")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PeerUnavailable, match=r"pip install 'sphinx-edge\[peers\]'"):
        check_peer("llama.cpp-Q4_0")


def test_peer_table_gives_ratios_to_the_fastest_peer():
    from sphinx_edge.benchmarks.stages import summary

    def rates(pp, tg):
        return {"pp_tokens": 512, "tg_tokens": 128, "pp_tok_s": summary([pp - 1, pp + 1]),
                "tg_tok_s": summary([tg, tg])}

    result = {"cases": [{"backend": "onnx", "quant": "int4", "group_size": 128, "vision_quant": "int8",
                         "llm": rates(100.0, 20.0),
                         "threads": 2, "peak_rss_mib": 900.0}],
              "peers": [{"peer": "llama.cpp-Q4_0", "artifact_bytes": 2**20, "threads": 2, "peak_rss_mib": 700.0,
                         **rates(200.0, 10.0)},
                        {"peer": "ort-genai-int4", "artifact_bytes": 2**20, "threads": 2, "peak_rss_mib": 800.0,
                         **rates(50.0, 40.0)}]}
    table = peer_table(result)
    assert "| onnx int4 g128/vis int8 | 2 | pp512: 100.0 ± 1.4 | 0.50x | tg128: 20.0 ± 0.0 | 0.50x | – | 900 |" in table
    assert "| llama.cpp-Q4_0 | 2 | pp512: 200.0 ± 1.4 | 1.00x | tg128: 10.0 ± 0.0 | 0.25x | 1.0 | 700 |" in table


@pytest.mark.parametrize("peer", ["llama.cpp-Q4_0", "llama.cpp-Q8_0"])
def test_gguf_holds_every_tensor_in_its_quantization(peer, tmp_path):
    needs(("gguf", "gguf"))
    import gguf

    path = prepare(peer, SMALL, tmp_path)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types) == len(list(llama_tensors(SMALL)))
    assert types["blk.0.attn_q.weight"] == PEERS[peer][1] and types["output_norm.weight"] == "F32"
    assert prepare(peer, SMALL, tmp_path) == path  # cached: not written again


def test_llama_cpp_runs_the_gguf(tmp_path):
    needs(("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"))
    r = run_peer("llama.cpp-Q4_0", SMALL, tmp_path, pp=16, tg=4, warmup=0, repeats=1, threads=1)
    assert r["pp_tok_s"]["median"] > 0 and r["tg_tok_s"]["median"] > 0 and r["peak_rss_mib"] > 0


def test_onnxruntime_genai_runs_its_int4_build(tmp_path):
    needs(("onnxruntime_genai", "onnxruntime-genai"))
    r = run_peer("ort-genai-int4", SMALL, tmp_path, pp=16, tg=4, warmup=0, repeats=1, threads=1)
    assert r["pp_tok_s"]["median"] > 0 and r["tg_tok_s"]["median"] > 0
    assert any(Path(tmp_path).rglob("genai_config.json"))
