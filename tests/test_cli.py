"""The command line, run as a user would (typer's runner, and one real subprocess)."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sphinx_edge.checkpoints.accessory import write_accessory
from sphinx_edge.bundled import SAMPLES
from sphinx_edge.cli import app
from tests.conftest import make_image

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_every_command_has_help():
    code, out = run("--help")
    assert code == 0
    commands = ["info", "tiles", "chat", "train", "eval", "data", "convert", "assemble", "demo", "export", "run",
                "bench", "profile", "request", "web", "warmup-encoders", "warmup-reading"]
    assert all(c in out for c in commands)
    helps = {}
    for command in commands:
        code, helps[command] = run(command, "--help")
        assert code == 0 and "Usage" in helps[command]
    # Square brackets in help texts are rich markup unless escaped: these must survive as written.
    flat = {c: " ".join(h.replace("│", " ").split()) for c, h in helps.items()}
    assert "pip install 'sphinx-edge[peers]'" in flat["bench"] and "sphinx-edge[bench]" in flat["bench"]
    assert "hf://OWNER/REPO[/SUBFOLDER]" in flat["convert"] and "the [export] or [train] extra" in flat["chat"]
    code, out = run("--version")
    assert code == 0 and out.strip().startswith("sphinx-edge ")


def test_info_reports_sizes_without_importing_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from sphinx_edge.cli import app;"
        "r = CliRunner().invoke(app, ['info', '--size', 'tiny'], env={'COLUMNS': '200'});"
        "print(r.output); assert 'torch' not in sys.modules, 'info imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "1.100 B" in out and "0.843 B" in out and "1.136 B" in out and "1295" in out
    code, out = run("info", "--size", "moe")
    assert code == 0 and "46.703 B" in out and "8, top-2" in out
    code, out = run("info", "--size", "huge")
    assert code == 2 and "unknown size 'huge'" in out


def test_tiles_shows_skipped_tiles_and_token_savings(tmp_path):
    code, out = run("tiles", SAMPLES / "wide_2x1.png", SAMPLES / "square.png")
    assert code == 0
    assert "##.." in out and "779" in out and "-40%" in out and "1295" in out
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, out = run("tiles", bad)
    assert code == 2 and "broken.png" in out


def test_convert_then_chat(model_factory, tokenizer_file, tmp_path):
    import shutil

    write_accessory(model_factory("test-tiny"), tmp_path / "released", mp=2)
    shutil.copy(tokenizer_file, tmp_path / "released" / "tokenizer.model")
    code, out = run("convert", tmp_path / "released", "--out", tmp_path / "ours", "--size", "test-tiny")
    assert code == 0, out
    make_image(100, 50).save(tmp_path / "img.png")
    code, out = run("chat", "What colour is the square?", "--checkpoint", tmp_path / "ours",
                    "--image", tmp_path / "img.png", "--max-new-tokens", "5")
    assert code == 0, out
    assert "prompt tokens" in out and "stop:" in out


@pytest.mark.parametrize("problem", ["missing", "wrong-size", "no-weights"])
def test_chat_refuses_bad_checkpoints_clearly(model_factory, tmp_path, problem):
    write_accessory(model_factory("test-tiny"), tmp_path / "released", mp=1)
    args = {"missing": ["--checkpoint", tmp_path / "nowhere"],
            "wrong-size": ["--checkpoint", tmp_path / "released", "--size", "test-moe"],
            "no-weights": ["--size", "tiny"]}[problem]
    code, out = run("chat", "hi", *args)
    assert code == 2 and "error:" in out
    assert {"missing": "does not exist", "wrong-size": "mixtral", "no-weights": "no weights ship for size 'tiny'"}[problem] in out


def test_run_and_chat_answer_from_the_bundled_export_when_given_no_model():
    from sphinx_edge.bundled import SAMPLES

    for command in ("run", "chat"):
        code, out = run(command, "--image", SAMPLES / "shapes_2x1.png", "Which side is the yellow triangle on?",
                        "--max-new-tokens", "6")
        assert code == 0 and out.split()[0].strip(".").lower() in ("left", "right", "top", "bottom"), out
    code, out = run("run", "--image", SAMPLES / "shapes_2x1.png")
    assert code == 2 and "Missing argument" in out


def test_a_view_budget_on_tiles_run_and_eval(tmp_path):
    """--max-views: the plan (tiles), the answer's image tokens (run) and an export's accuracy (eval)."""
    import re

    from sphinx_edge.bundled import NANO_EXPORT
    from sphinx_edge.runtime.pipeline import Pipeline
    from sphinx_edge.train.synthetic import answer_of, normalize_answer, question_of

    image = SAMPLES / "shapes_2x1.png"
    code, out = run("tiles", image, "--size", "nano", "--max-views", "1")
    assert code == 0 and "...." in out, out
    tokens = {}
    for budget in ("1", "3"):
        code, out = run("run", "--image", image, "What color is the circle?", "--max-views", budget,
                        "--max-new-tokens", "2")
        assert code == 0, out
        tokens[budget] = int(re.search(r"\((\d+) image\)", out).group(1))
    assert tokens["1"] < tokens["3"]
    code, out = run("data", "synth", "--out", tmp_path / "data", "--train", "1", "--test", "6")
    assert code == 0, out
    code, out = run("eval", "--export", NANO_EXPORT, "--data", tmp_path / "data" / "test.json", "--max-views", "1",
                    "--json", tmp_path / "scores.json")
    assert code == 0, out
    scores = json.loads((tmp_path / "scores.json").read_text())
    pipeline = Pipeline(NANO_EXPORT, max_views=1)
    records = json.loads((tmp_path / "data" / "test.json").read_text())
    hits = [normalize_answer(pipeline.answer(question_of(r), tmp_path / "data" / r["image"], max_new_tokens=16).text)
            == normalize_answer(answer_of(r)) for r in records]
    assert scores["n"] == 6 and scores["max_views"] == 1 and scores["accuracy"] == sum(hits) / 6
    code, out = run("eval", "--export", NANO_EXPORT, "--size", "nano", "--data", tmp_path / "data" / "test.json")
    assert code == 2 and "give one of them" in out


def test_data_train_eval_and_chat_commands(tmp_path):
    """The nano pipeline's commands (`make nano`: data, reading set, tokenizer, warm-up, recipe, eval, chat), end to end on a tiny run."""
    import json


    code, out = run("data", "synth", "--out", tmp_path / "data", "--train", "40", "--test", "10")
    assert code == 0, out
    code, out = run("data", "synth", "--out", tmp_path / "reading", "--train", "9", "--test", "0", "--domains", "text")
    assert code == 0, out
    assert {r["domain"] for r in json.loads((tmp_path / "reading" / "train.json").read_text())} == {"text"}
    assert not (tmp_path / "reading" / "test.json").exists()
    code, out = run("data", "synth", "--out", tmp_path / "bad", "--domains", "text,scribbles")
    assert code == 2 and "scribbles" in out and not (tmp_path / "bad").exists()
    code, out = run("data", "synth", "--out", tmp_path / "charts", "--train", "9", "--test", "0", "--domains", "chart",
                    "--look", "varied")
    assert code == 0, out
    charts = json.loads((tmp_path / "charts" / "train.json").read_text())
    assert {(r["domain"], r["look"]) for r in charts} == {("chart", "varied")} and all(r["drawn"] for r in charts)
    code, out = run("data", "tokenizer", tmp_path / "data" / "train.json", "--out", tmp_path / "tok.model",
                    "--vocab-size", "256")
    assert code == 2 and "too small" in out
    code, out = run("data", "tokenizer", tmp_path / "data" / "train.json", "--out", tmp_path / "tok.model",
                    "--vocab-size", "400")
    assert code == 0, out
    code, out = run("warmup-encoders", tmp_path / "data" / "train.json", "--out", tmp_path / "warm", "--steps", "2",
                    "--batch-size", "4", "--tokenizer", tmp_path / "tok.model", "--eval", tmp_path / "data" / "test.json")
    assert code == 0, out
    assert "experts + warm-up classifier on" in out and (tmp_path / "warm" / "model.safetensors").is_file()
    code, out = run("warmup-encoders", tmp_path / "missing.json", "--out", tmp_path / "warm2")
    assert code == 2 and "missing.json" in out and not (tmp_path / "warm2").exists()
    code, out = run("warmup-encoders", tmp_path / "data" / "train.json", "--out", tmp_path / "warm2",
                    "--init", tmp_path / "data")
    assert code == 2 and "not a model directory" in out and not (tmp_path / "warm2").exists()
    code, out = run("warmup-reading", "--out", tmp_path / "read", "--init", tmp_path / "data")
    assert code == 2 and "not a model directory" in out and not (tmp_path / "read").exists()
    code, out = run("warmup-reading", "--out", tmp_path / "read", "--tokenizer", tmp_path / "missing.model")
    assert code == 2 and "missing.model" in out and not (tmp_path / "read").exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'size = "nano"\nout_dir = "{tmp_path / "run"}"\ntokenizer = "{tmp_path / "tok.model"}"\n'
        f'init = "{tmp_path / "warm"}"\nfreeze_encoders = false\nencoder_lr_ratio = 0.5\n'
        'steps = 2\nbatch_size = 2\nmax_len = 256\ndtype = "fp32"\nlog_every = 1\n'
        f'[[data]]\njson = "{tmp_path / "data" / "train.json"}"\nweight = 0.8\n'
        f'[[data]]\njson = "{tmp_path / "reading" / "train.json"}"\nweight = 0.2\n')
    code, out = run("train", recipe, "lr=0.001")
    assert code == 0, out
    assert "step 2/2" in out
    code, out = run("train", recipe, "--export", tmp_path / "exported")
    assert code == 0, out
    from safetensors.torch import load_file

    exported, final, warm = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("exported", "run/model", "warm"))
    assert exported.keys() == final.keys() and all((exported[k] == final[k]).all() for k in final)
    assert not (final["convnext.stem.0.weight"] == warm["convnext.stem.0.weight"]).all()  # the experts train on
    code, out = run("eval", "--checkpoint", tmp_path / "run" / "model", "--data", tmp_path / "data" / "test.json",
                    "--limit", "4", "--json", tmp_path / "scores.json", "--mistakes", "4")
    assert code == 0, out
    scores = json.loads((tmp_path / "scores.json").read_text())
    # The score is the exact-match rate of the model's own answers, recomputed here.
    from sphinx_edge.checkpoints import load_model
    from sphinx_edge.generate import generate
    from sphinx_edge.tokenizer import Tokenizer
    from sphinx_edge.train.synthetic import answer_of, normalize_answer, question_of

    model, tok = load_model(tmp_path / "run" / "model"), Tokenizer(tmp_path / "run" / "model" / "tokenizer.model")
    records = json.loads((tmp_path / "data" / "test.json").read_text())[:4]
    hits = [normalize_answer(generate(model, tok, question_of(r), tmp_path / "data" / r["image"], max_new_tokens=16).text)
            == normalize_answer(answer_of(r)) for r in records]
    assert scores["n"] == 4 and scores["accuracy"] == sum(hits) / 4 and "exact match" in out
    assert len(scores["mistakes"]) == 4 - sum(hits) and (f"wrong answers ({4 - sum(hits)} of" in out) == (sum(hits) < 4)
    image = json.loads((tmp_path / "data" / "test.json").read_text())[0]["image"]
    code, out = run("chat", "What shape is shown?", "--checkpoint", tmp_path / "run" / "model",
                    "--image", tmp_path / "data" / image, "--max-new-tokens", "3")
    assert code == 0, out
    code, out = run("train", tmp_path / "missing.toml")
    assert code == 2 and "missing.toml" in out
    code, out = run("train", recipe, "llm_layers=6", f"out_dir={tmp_path / 'deeper'}")  # Nano has 4 blocks
    assert code == 2 and "multiple" in out and not (tmp_path / "deeper").exists()
    code, out = run("train", recipe, "view_size=100", f"out_dir={tmp_path / 'finer'}")
    assert code == 2 and "multiple of 32" in out and not (tmp_path / "finer").exists()


def test_export_explains_missing_weights_and_bad_options(tmp_path):
    code, out = run("export", "--size", "tiny", "--out", tmp_path / "e")
    assert code == 2 and "SPHINX-Tiny" in out and "--random-init" in out
    code, out = run("export", "--size", "huge", "--out", tmp_path / "e")
    assert code == 2 and "unknown size 'huge'" in out
    code, out = run("export", "--out", tmp_path / "e")
    assert code == 2 and "give --size (or --checkpoint DIR" in out
    code, out = run("export", "--random-init", "--out", tmp_path / "e")
    assert code == 2 and "give --size" in out
    code, out = run("export", "--size", "test-tiny", "--quant", "fp16", "--format", "pte", "--random-init",
                    "--out", tmp_path / "e")
    assert code == 2 and "fp16 is not offered for pte graphs" in out and "--format onnx" in out
    code, out = run("export", "--size", "test-tiny", "--random-init", "--tokenizer", tmp_path / "none.model",
                    "--out", tmp_path / "e")
    assert code == 2 and "does not exist" in out
    assert not (tmp_path / "e").exists()


def test_export_then_run(tokenizer_file, tmp_path):
    code, out = run("export", "--size", "test-tiny", "--random-init", "--tokenizer", tokenizer_file, "--quant", "int8",
                    "--out", tmp_path / "e")
    assert code == 0, out
    assert "decoder.onnx" in out and "tokenizer.model" in out
    assert "top-1 agreement" in out
    make_image(50, 100).save(tmp_path / "tall.png")
    code, out = run("run", tmp_path / "e", "What is it?", "--image", tmp_path / "tall.png",
                    "--max-new-tokens", "3")
    assert code == 0, out
    assert "image)" in out and "vision" in out and "prefill" in out
    code, out = run("export", "--size", "test-tiny", "--random-init", "--tokenizer", tokenizer_file,
                    "--out", tmp_path / "e")
    assert code == 2 and "already holds an export of 'test-tiny'" in out
    code, out = run("run", tmp_path / "nowhere", "hi")
    assert code == 2 and "not a directory" in out


def test_chat_with_an_export_keeps_the_cache_between_turns(onnx_export):
    _, out_dir, _ = onnx_export
    result = runner.invoke(app, ["chat", str(out_dir), "--image", str(SAMPLES / "wide_2x1.png"), "--max-new-tokens", "3"],
                           input="What is it?\nAnd the colour?\n\n", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    stats = [line for line in result.output.splitlines() if "tokens in context" in line]
    assert len(stats) == 2
    first_context, first_prefill = (int(stats[0].split(" tokens in context")[0].split()[-1]),
                                    int(stats[0].split(" prefilled")[0].split()[-1]))
    second_context, second_prefill = (int(stats[1].split(" tokens in context")[0].split()[-1]),
                                      int(stats[1].split(" prefilled")[0].split()[-1]))
    assert first_prefill == first_context
    assert second_context > first_context and second_prefill < second_context - first_context + 5
    code, out = run("chat", out_dir, "tell me " * 400, "--image", SAMPLES / "wide_2x1.png")
    assert code == 2 and "the context holds" in out


def test_bench_prints_the_table_and_refuses_bad_options(onnx_export, tmp_path):
    _, out_dir, _ = onnx_export
    code, out = run("bench", out_dir, "--format", "onnx", "--image", SAMPLES / "tall_1x3.png", "--repeats", "1",
                    "--warmup", "0", "--pp", "8", "--tg", "2", "--decode-tokens", "2", "--no-bandwidth",
                    "--json", tmp_path / "b.json")
    assert code == 0, out
    threads = json.loads((tmp_path / "b.json").read_text())["threads"]
    assert out.count(f"| onnx fp32 | {threads} | tall_1x3.png |") == 3 and "pp8:" in out
    code, out = run("bench", out_dir, "--format", "tflite")
    assert code == 2 and "unknown --format or --peer 'tflite'" in out
    code, out = run("bench", tmp_path, "--format", "onnx")
    assert code == 2 and "manifest.json" in out
    code, out = run("bench", out_dir, "--target", "apple")
    assert code == 2 and "Apple silicon" in out


def test_profile_prints_the_operator_table_and_refuses_bad_options(onnx_export, tmp_path):
    _, out_dir, _ = onnx_export
    code, out = run("profile", out_dir, "--pp", "8", "--tg", "3", "-t", "1", "--json", tmp_path / "p.json")
    assert code == 0, out
    assert "onnx, 1 threads: prefill 8 tokens" in out and "| GroupQueryAttention |" in out
    assert json.loads((tmp_path / "p.json").read_text())["tg"] == 3
    code, out = run("profile", out_dir, "--format", "tflite")
    assert code == 2 and "'tflite' is not one of" in out and "onnx" in out
    code, out = run("profile", out_dir, "--format", "pte")
    assert code == 2 and "has no pte graphs" in out
    code, out = run("profile", tmp_path)
    assert code == 2 and "manifest.json" in out


def test_a_long_piped_chat_on_the_bundled_model_answers_every_turn(nano_int4_pte):
    """The history outgrows Nano's 512-token context after about 27 turns: the oldest turns go, the
    conversation goes on, and the end of input ends the chat cleanly."""
    questions = "".join(f"What colour is shape {i}?\n" for i in range(60))  # no empty line: end of input ends it
    result = runner.invoke(app, ["chat", str(nano_int4_pte), "--format", "pte", "--image",
                                 str(SAMPLES / "shapes_2x1.png"), "--max-new-tokens", "4"],
                           input=questions, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output[-3000:]
    assert result.output.count("tokens in context") == 60
    assert "dropped its oldest turn" in result.output and "error" not in result.output
    assert "Aborted" not in result.output
    contexts = [int(line.split(" tokens in context")[0].split()[-1]) for line in result.output.splitlines()
                if "tokens in context" in line]
    assert max(contexts) < 512


def test_chat_names_a_directory_that_is_not_an_export(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, out = run("chat", tmp_path, "What is it?")
    assert code == 2 and "manifest.json" in out and "arguments" not in out
