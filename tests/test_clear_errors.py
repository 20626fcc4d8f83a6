"""Every bad input the project knows of ends in one message that names the file, flag or value and what
to do, never a traceback: a table of inputs walked through the command-line tools. (In-process: an
exception other than SystemExit would fail the test, as a traceback would show one.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moma_plugin.data import preprocess
from moma_plugin.training import aux_routers, convert, generate, loop, upcycle

from .test_pretrain import REPO, TINY

FAST = [*TINY, "--train-iters", "2", "--eval-interval", "100000"]
PAPER = REPO / "examples" / "configs" / "paper" / "4t4i_90m.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """A finished tiny run (checkpoint of iteration 2) and a small dataset, shared by the table."""
    request.getfixturevalue("megatron_single_process")
    root = tmp_path_factory.mktemp("world")
    loop.pretrain([*FAST, "--run-dir", str(root / "run")])
    from .test_data_safety import _corpus

    preprocess.main(["--input", str(_corpus(root / "corpus", "apple orchard", 120)), "--output-prefix",
                     str(root / "data" / "ds"), "--quiet", "--codebook-size", "16"])
    return root


def _copy_run(world: Path, tmp_path: Path) -> Path:
    shutil.copytree(world / "run", tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def _copy_data(world: Path, tmp_path: Path) -> Path:
    shutil.copytree(world / "data", tmp_path / "data")
    return tmp_path / "data" / "ds"


def _truncate(path: Path, size=None):
    os.truncate(path, path.stat().st_size // 2 if size is None else size)


def _edit_json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


RANK0 = "iter_0000002/mp_rank_00/model_optim_rng.pt"


def _setup(case: str, world: Path, tmp: Path):
    """Builds what case ``case`` needs under ``tmp``; returns (tool main, argv)."""
    ckpt = lambda: _copy_run(world, tmp)  # noqa: E731
    data = lambda: _copy_data(world, tmp)  # noqa: E731
    pre = lambda *a: (preprocess.main, list(a))  # noqa: E731
    pt = lambda *a: (loop.main, [*FAST, "--run-dir", str(tmp / "new"), *a])  # noqa: E731
    if case in ("corrupt checkpoint", "corrupt checkpoint without manifest"):
        save = ckpt()
        size = (save / RANK0).stat().st_size
        (save / RANK0).write_bytes(b"not a checkpoint at all".ljust(size, b"!"))
        if case.endswith("without manifest"):  # written before checkpoints had manifests
            (save / "iter_0000002" / "manifest.json").unlink()
        return pt("--load", str(save))
    if case == "truncated checkpoint":
        save = ckpt()
        _truncate(save / RANK0)
        return pt("--load", str(save))
    if case in ("garbage tracker", "empty tracker"):
        save = ckpt()
        shutil.rmtree(save / "iter_0000002")
        (save / "latest_checkpointed_iteration.txt").write_text("x7!" if case == "garbage tracker" else "")
        return loop.main, [*FAST, "--run-dir", str(save.parent)]
    if case == "missing iteration directory":
        save = ckpt()
        shutil.rmtree(save / "iter_0000002")
        (save / "latest_checkpointed_iteration.txt").write_text("7")
        return pt("--load", str(save))
    if case == "truncated .bin":
        prefix = data()
        _truncate(Path(f"{prefix}.bin"))
        return pt("--data-path", str(prefix))
    if case == "empty .bin":
        prefix = data()
        _truncate(Path(f"{prefix}.bin"), 0)
        return pt("--data-path", str(prefix))
    if case == "truncated .idx":
        prefix = data()
        _truncate(Path(f"{prefix}.idx"), 20)
        return pt("--data-path", str(prefix))
    if case == "mismatched .idx":
        prefix = data()
        from .test_data_safety import _corpus

        other = preprocess.run(["--input", str(_corpus(tmp / "small", "zebra", 5)), "--output-prefix",
                                str(tmp / "other" / "ds"), "--quiet", "--codebook-size", "8"])
        shutil.copy(f"{other['output_prefix']}.idx", f"{prefix}.idx")
        return pt("--data-path", str(prefix))
    if case == "token ids beyond the vocabulary":
        prefix = data()

        def shrink(v):
            v["modality_sizes"]["image"] = 2
            v.pop("vocab_size")
        _edit_json(Path(f"{prefix}.vocab.json"), shrink)
        return pt("--data-path", str(prefix), "--valid-fraction", "0.3")
    if case == "invalid vocabulary JSON":
        prefix = data()
        Path(f"{prefix}.vocab.json").write_text('{"text_size": 12, "modality_si')
        return pt("--data-path", str(prefix))
    if case == "incomplete vocabulary JSON":
        prefix = data()
        Path(f"{prefix}.vocab.json").write_text('{"text_size": 12}')
        return pt("--data-path", str(prefix))
    if case in ("latin-1 line", "latin-1 line, --skip-bad", "lone surrogate", "lone surrogate, --skip-bad"):
        source = tmp / "docs.jsonl"
        line = ('{"segments": [{"text": "caf\xe9"}]}'.encode("latin-1") if "latin" in case
                else b'{"segments": [{"text": "bad \\ud800 text"}]}')
        source.write_bytes(b'{"segments": [{"text": "fine"}]}\n' + line + b"\n")
        skip = ["--skip-bad"] if "skip" in case else []
        return pre("--input", str(source), "--output-prefix", str(tmp / "out"), "--quiet",
                   "--text-tokenizer", "bytes", "--image-tokenizer",
                   str(world / "data" / "ds.tokenizers" / "image"), *skip)
    if case.startswith("resume with other "):
        save = ckpt()
        flag = {"resume with other --seq-length": ["--seq-length", "32"],
                "resume with other --max-position-embeddings": ["--max-position-embeddings", "128"],
                "resume with other data": ["--data-path", str(data()), "--valid-fraction", "0.3",
                                           "--no-balanced-sampler"]}[case]
        return loop.main, [*FAST, "--train-iters", "4", "--run-dir", str(save.parent), *flag]
    if case == "tracker with a non-ASCII digit":
        save = ckpt()
        (save / "latest_checkpointed_iteration.txt").write_text("\u00b2")
        shutil.rmtree(save / "iter_0000002")
        return pt("--load", str(save))
    if case in ("empty manifest", "manifest that is a list"):
        save = ckpt()
        (save / "iter_0000002" / "manifest.json").write_text("{}" if case == "empty manifest" else "[]")
        return pt("--load", str(save))
    if case == "damaged files record in the vocabulary":
        prefix = data()
        _edit_json(Path(f"{prefix}.vocab.json"), lambda v: v["files"].update({".bin": {}}))
        return pt("--data-path", str(prefix))
    if case == "non-finite --data-path weight":
        return pt("--data-path", "nan", "bundled:interleaved", "1", "bundled:text")
    if case == "a run directory that is a file":
        (tmp / "afile").write_text("x")
        return loop.main, [*FAST, "--run-dir", str(tmp / "afile")]
    if case == "--ckpt-step without a checkpoint":
        return pt("--ckpt-step", "3")
    if case in ("--config that is a directory", "--config in latin-1", "--config with a mapping value"):
        config = tmp / "c.yaml"
        if case.endswith("directory"):
            config.mkdir()
        elif case.endswith("latin-1"):
            config.write_bytes("name: caf\xe9\n".encode("latin-1"))
        else:
            config.write_text("hidden-size: {a: 1}\n")
        return loop.main, ["--config", str(config), "--no-save"]
    if case in ("JSON nested too deeply", "an integer of 5,000 digits", "text and image in one segment",
                "too few images for the codebook"):
        source = tmp / "docs.jsonl"
        line = {"JSON nested too deeply": "[" * 100000,
                "an integer of 5,000 digits": '{"segments": [{"text": "a"}], "n": ' + "9" * 5000 + "}",
                "text and image in one segment": '{"segments": [{"text": "both", "image": "x.png"}]}',
                "too few images for the codebook": ""}[case]
        shutil.copy(world / "corpus" / "d0.png", tmp / "d0.png")
        source.write_text('{"segments": [{"text": "fine"}, {"image": "d0.png"}]}\n' + line + "\n")
        return pre("--input", str(source), "--output-prefix", str(tmp / "out"), "--quiet")
    if case == "moma-generate --output-dir that is a file":
        (tmp / "afile").write_text("x")
        return generate.main, ["--load", str(ckpt()), "--output-dir", str(tmp / "afile")]
    if case == "moma-compare on a run.json that is a list":
        from moma_plugin import compare

        (tmp / "r").mkdir()
        (tmp / "r" / "run.json").write_text("[]")
        (tmp / "r" / "metrics.jsonl").write_text("")
        return compare.main, [str(tmp / "r"), "--output", str(tmp / "c.png")]
    if case == "a blend of datasets with other tokenizers":
        prefix = data()
        from .test_data_safety import _corpus

        preprocess.run(["--input", str(_corpus(tmp / "o", "zebra", 30)), "--output-prefix",
                        str(tmp / "other" / "ds"), "--quiet", "--codebook-size", "16", "--seed", "7",
                        "--text-tokenizer", f"{prefix}.tokenizers/text"])
        return pt("--data-path", "1", str(prefix), "1", str(tmp / "other" / "ds"))
    if case == "moma-generate on untrained aux routers":
        return generate.main, ["--load", str(ckpt()), "--output-dir", str(tmp / "gen")]
    if case == "moma-generate without a checkpoint":
        return generate.main, ["--load", str(tmp / "nothing")]
    if case == "moma-train-aux-routers without a checkpoint":
        return aux_routers.main, ["--load", str(tmp / "nothing"), "--save", str(tmp / "aux")]
    if case == "moma-convert-checkpoint without a checkpoint":
        return convert.main, ["--load", str(tmp / "nothing"), "--save", str(tmp / "out")]
    if case == "moma-convert-checkpoint onto its --load":
        load = str(ckpt())
        return convert.main, ["--load", load, "--save", load]
    if case == "moma-upcycle without a checkpoint":
        return upcycle.main, ["--load", str(tmp / "nothing"), "--save", str(tmp / "up"), "--moma-experts", "4t4i"]
    if case == "moma-upcycle of a checkpoint with several experts per group":
        return upcycle.main, ["--load", str(ckpt()), "--save", str(tmp / "up"), "--moma-experts", "8t8i"]
    raise KeyError(case)


CASES = [
    # (case, expected message, tool prefix)
    ("corrupt checkpoint", f"{RANK0} does not match its SHA-256", "moma-pretrain"),
    ("corrupt checkpoint without manifest", f"{RANK0} cannot be read", "moma-pretrain"),
    ("truncated checkpoint", "(truncated)", "moma-pretrain"),
    ("garbage tracker", "holds 'x7!', not an iteration number", "moma-pretrain"),
    ("empty tracker", "holds '', not an iteration number", "moma-pretrain"),
    ("missing iteration directory", "iter_0000007 is missing", "moma-pretrain"),
    ("truncated .bin", "the files are from different moma-preprocess runs or one is truncated",
     "moma-pretrain"),
    ("empty .bin", "ds.bin has 0 bytes but", "moma-pretrain"),
    ("truncated .idx", "ds.idx has 20 bytes but", "moma-pretrain"),
    ("mismatched .idx", "the files are from different moma-preprocess runs", "moma-pretrain"),
    ("token ids beyond the vocabulary", "holds token id", "moma-pretrain"),
    ("invalid vocabulary JSON", "ds.vocab.json is not valid JSON", "moma-pretrain"),
    ("incomplete vocabulary JSON", "ds.vocab.json lacks modality_sizes", "moma-pretrain"),
    ("latin-1 line", "docs.jsonl:2: not UTF-8 text (byte 0xe9 at column 28)", "moma-preprocess"),
    ("lone surrogate", "docs.jsonl:2: segment 1: text holds a lone surrogate", "moma-preprocess"),
    ("resume with other --seq-length", "--seq-length: checkpoint 64, now 32", "moma-pretrain"),
    ("resume with other --max-position-embeddings", "--max-position-embeddings: checkpoint 64, now 128",
     "moma-pretrain"),
    ("resume with other data", "--data-path: checkpoint None, now", "moma-pretrain"),
    ("moma-generate on untrained aux routers", "moma-train-aux-routers", "moma-generate"),
    ("tracker with a non-ASCII digit", "holds '\u00b2', not an iteration number", "moma-pretrain"),
    ("empty manifest", "manifest.json is damaged (not a checkpoint manifest", "moma-pretrain"),
    ("manifest that is a list", "manifest.json is damaged (not a checkpoint manifest", "moma-pretrain"),
    ("damaged files record in the vocabulary", "its 'files' record is damaged", "moma-pretrain"),
    ("non-finite --data-path weight", "weight 'nan' (before 'bundled:interleaved') must be a positive finite",
     "moma-pretrain"),
    ("a run directory that is a file", "afile is a file, not a directory", "moma-pretrain"),
    ("--ckpt-step without a checkpoint", "--ckpt-step 3 needs a checkpoint to resume", "moma-pretrain"),
    ("--config that is a directory", "c.yaml is a directory; give a YAML file", "moma-pretrain"),
    ("--config in latin-1", "c.yaml is not UTF-8 text", "moma-pretrain"),
    ("--config with a mapping value", "hidden-size takes a single value or a list, not a mapping",
     "moma-pretrain"),
    ("JSON nested too deeply", "docs.jsonl:2: JSON nested too deeply to read", "moma-preprocess"),
    ("an integer of 5,000 digits", "docs.jsonl:2: not valid JSON (Exceeds the limit", "moma-preprocess"),
    ("text and image in one segment", "docs.jsonl:2: segment 1 has both text and image", "moma-preprocess"),
    ("too few images for the codebook", "16 patches cannot fit a codebook of 256", "moma-preprocess"),
    ("moma-generate --output-dir that is a file", "(Not a directory)",
     "moma-generate"),
    ("moma-compare on a run.json that is a list", "run.json holds a list, not the run's description",
     "moma-compare"),
    ("a blend of datasets with other tokenizers", "blends datasets written with different tokenizers",
     "moma-pretrain"),
    ("moma-generate without a checkpoint", "nothing: no complete checkpoint there", "moma-generate"),
    ("moma-train-aux-routers without a checkpoint", "nothing: no complete checkpoint there",
     "moma-train-aux-routers"),
    ("moma-convert-checkpoint without a checkpoint", "nothing: no complete checkpoint there",
     "moma-convert-checkpoint"),
    ("moma-convert-checkpoint onto its --load", "is --load: give another directory",
     "moma-convert-checkpoint"),
    ("moma-upcycle without a checkpoint", "nothing: no complete checkpoint there", "moma-upcycle"),
    ("moma-upcycle of a checkpoint with several experts per group", "its group 'text' has 4 experts",
     "moma-upcycle"),
]


@pytest.mark.parametrize("case, message, tool", CASES, ids=[c[0] for c in CASES])
def test_bad_inputs_end_in_one_clear_message(world, tmp_path, capsys, case, message, tool):
    main, argv = _setup(case, world, tmp_path)
    with pytest.raises(SystemExit) as error:
        main(argv)
    text = f"{error.value.code}\n{capsys.readouterr().err}"
    assert f"{tool}: error: " in text, text
    assert message in text, text
    if tool != "moma-pretrain":
        assert "moma-pretrain:" not in text, text


@pytest.mark.parametrize("case", ["latin-1 line, --skip-bad", "lone surrogate, --skip-bad"])
def test_skip_bad_skips_undecodable_lines_and_says_why(world, tmp_path, capsys, case):
    main, argv = _setup(case, world, tmp_path)
    main(argv)
    captured = capsys.readouterr()
    assert '"documents": 1' in captured.out and '"skipped": 1' in captured.out
    assert "skipped: " in captured.err and "docs.jsonl:2:" in captured.err


# (tool, flags, message): argparse-level checks, exit status 2.
FLAG_CASES = [
    ("moma-pretrain", ["--moma-capacity-factor", "inf"], "--moma-capacity-factor must be a positive finite number"),
    ("moma-pretrain", ["--num-query-groups", "3"], "--num-query-groups 3 must be at least 1 and divide --num-attention-heads 4"),
    ("moma-pretrain", ["--num-query-groups", "0"], "--num-query-groups 0 must be at least 1"),
    ("moma-pretrain", ["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be at least 1"),
    ("moma-pretrain", ["--seed", "-1"], "--seed must lie in [0, 2**32)"),
    ("moma-pretrain", ["--seed", str(2 ** 32)], "--seed must lie in [0, 2**32)"),
    ("moma-pretrain", ["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    ("moma-pretrain", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    ("moma-pretrain", ["--hidden-dropout", "1.5"], "--hidden-dropout must lie in [0.0, 1.0)"),
    ("moma-pretrain", ["--attention-dropout", "-0.1"], "--attention-dropout must lie in [0.0, 1.0)"),
    ("moma-pretrain", ["--adam-beta1", "1"], "--adam-beta1 must lie in [0.0, 1.0)"),
    ("moma-pretrain", ["--adam-beta2", "-0.5"], "--adam-beta2 must lie in [0.0, 1.0)"),
    ("moma-pretrain", ["--adam-eps", "0"], "--adam-eps must be a positive number"),
    ("moma-pretrain", ["--balance-tolerance", "0"], "--balance-tolerance must lie in (0, 1)"),
    ("moma-pretrain", ["--balance-tolerance", "1.5"], "--balance-tolerance must lie in (0, 1)"),
    ("moma-pretrain", ["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0"),
    ("moma-pretrain", ["--lr", "inf"], "--lr must be a positive number"),
    ("moma-pretrain", ["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must lie in [0, 1)"),
    ("moma-pretrain", ["--keep-last", "0"], "--keep-last must be at least 1"),
    ("moma-pretrain", ["--global-batch-size", "0"], "--global-batch-size must be at least 1"),
    ("moma-pretrain", ["--global-batch-size", "-4"], "--global-batch-size must be at least 1"),
    ("moma-pretrain", ["--pipeline-model-parallel-size", "0"], "--pipeline-model-parallel-size must be at least 1, got 0"),
    ("moma-pretrain", ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "exclude each other"),
    # the MoMa flag is reported, not the warm-up check it would explain
    ("moma-pretrain", ["--moma-experts", "4q4i", "--lr-warmup-iters", "500", "--train-iters", "10"], "--moma-experts:"),
    ("moma-pretrain", ["--config", str(PAPER), "--train-iters", "100"],
     f"--lr-warmup-iters 4000 (from {PAPER}) must be below --lr-decay-iters 100 (= --train-iters); "
     "pass --lr-warmup-iters 10 or --lr-warmup-fraction 0.1 with it"),
    ("moma-generate", ["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    ("moma-generate", ["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    ("moma-generate", ["--top-k", "-3"], "--top-k must be >= 0"),
    ("moma-generate", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("moma-generate", ["--aux-threshold", "1"], "--aux-threshold must lie in (0, 1)"),
    ("moma-preprocess", ["--codebook-size", "0"], "--codebook-size must lie in [1, 65536]"),
    ("moma-preprocess", ["--patch-size", "0"], "--patch-size must divide --image-size 16"),
    ("moma-preprocess", ["--patch-size", "5"], "--patch-size must divide --image-size 16"),
    ("moma-preprocess", ["--image-size", "0"], "--image-size must lie in [1, 1024]"),
    ("moma-preprocess", ["--image-size", "100000"], "--image-size must lie in [1, 1024]"),
    ("moma-preprocess", ["--text-vocab-size", "-1"], "--text-vocab-size must lie in [1, 1048576]"),
    ("moma-preprocess", ["--seed", "-1"], "--seed must lie in [0, 2**32)"),
    ("moma-preprocess", ["--workers", "0"], "--workers must be at least 1"),
    ("moma-preprocess", ["--output-prefix", ""], "--output-prefix '' names no file prefix"),
]
TOOLS = {  # tool: (main, the arguments every case of it starts with)
    "moma-pretrain": (loop.main, lambda tmp: ["--no-save"]),
    "moma-generate": (generate.main, lambda tmp: ["--load", "somewhere"]),
    "moma-preprocess": (preprocess.main, lambda tmp: ["--input", str(REPO / "examples/data/docs.jsonl"),
                                                      "--output-prefix", str(tmp / "ds")]),
}


@pytest.mark.parametrize("tool, flags, message", FLAG_CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}"[:50] for c in FLAG_CASES])
def test_bad_flags_name_the_flag(tool, flags, message, capsys, tmp_path):
    main, base = TOOLS[tool]
    with pytest.raises(SystemExit) as error:
        main([*base(tmp_path), *flags])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert f"{tool}: error: " in err and message in err, err
    if tool != "moma-pretrain":
        assert "moma-pretrain" not in err, err


def test_tensor_parallelism_without_torchrun_prints_the_torchrun_command(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "moma_plugin.pretrain", "--tensor-model-parallel-size",
                           "2", "--train-iters", "3", "--run-dir", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert ("moma-pretrain: error: --tensor-model-parallel-size 2 needs 2 processes (one per rank); "
            "launch it with torchrun:\n  torchrun --nproc-per-node 2 -m moma_plugin.pretrain "
            f"--tensor-model-parallel-size 2 --train-iters 3 --run-dir {tmp_path}") in proc.stderr


def test_help_shows_every_default_once(capsys):
    """Every option of every tool says its default exactly once, and on/off flags read the right way
    (``--no-save ... (default: not set)``, never ``(default: True)`` for a flag that turns a thing off)."""
    import re

    from moma_plugin import compare
    from moma_plugin.training.arguments import build_parser

    parsers = {"moma-pretrain": build_parser(), "moma-train-aux-routers": aux_routers.build_parser(),
               "moma-generate": generate.build_parser(), "moma-preprocess": preprocess.build_parser(),
               "moma-compare": compare.build_parser()}
    for tool, parser in parsers.items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            shown = parser._get_formatter()._expand_help(action)
            assert shown.lower().count("default") == 1, (tool, action.option_strings, shown)
            assert not re.search(r"default: (True|False)", shown), (tool, action.option_strings, shown)
        with pytest.raises(SystemExit) as done:
            parser.parse_args(["--help"])
        assert done.value.code == 0 and "--" in capsys.readouterr().out
