"""Bad input is refused before any process starts: one line, `error: ...`, naming the field, its
value and the fix; a non-zero exit; no traceback; no run folder created (or, if one exists, left as it
was). Every class of mistake below goes through the real CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import TINY, cli

pytestmark = pytest.mark.e2e
Setup = Callable[[Path], list[str]]  # makes what a case needs under tmp, returns extra CLI arguments


def _none(tmp: Path) -> list[str]:
    return []


def _files(content: str, name: str = "a.txt") -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "corpus").mkdir()
        (tmp / "corpus" / name).write_text(content)
        return ["--set", "data.source=files", "--set", f"data.path={tmp / 'corpus'}"]

    return setup


def _tokenizer(vocab_size: int | None) -> Setup:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "tokenizer.json"
        if vocab_size is None:
            path.write_text("{ not json")
        else:
            from tokenizers import Tokenizer
            from tokenizers.models import WordLevel

            Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")).save(str(path))
        return ["--set", f"data.tokenizer={path}"]

    return setup


def _run_dir_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("x")
    return ["--run-dir", str(tmp / "taken")]


def _under_a_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("x")
    return ["--run-dir", str(tmp / "taken" / "run")]


def _held_run(tmp: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")
    return ["--set", "checkpoint.resume=never"]


def _set(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


CASES: list[tuple[str, list[str], Setup, str]] = [  # id, arguments, setup, fragment of the error line
    ("unknown key", _set("training.stepz=3"), _none, "did you mean 'training.steps'"),
    ("unknown section", _set("trainng.steps=3"), _none, "unknown config section 'trainng'"),
    ("not an int", _set("training.steps=abc"), _none, "training.steps='abc' is not a valid int"),
    ("not a bool", _set("parallel.offload=maybe"), _none, "is not a boolean"),
    ("set without =", ["--set", "training.steps"], _none, "needs the form section.key=value"),
    ("missing config", ["--config", "/nonexistent.toml"], _none, "does not exist"),
    ("lr nan", _set("training.lr=nan"), _none, "training.lr=nan is not a finite number"),
    ("lr inf", _set("training.lr=inf"), _none, "training.lr=inf is not a finite number"),
    ("grad_clip nan", _set("training.grad_clip=nan"), _none, "training.grad_clip=nan is not a finite number"),
    ("negative lr", _set("training.lr=-1"), _none, "training.lr=-1.0 must not be negative"),
    ("beta1 = 1", _set("optimizer.beta1=1"), _none, "optimizer.beta1=1.0 must be in [0, 1)"),
    ("beta2 = 1", _set("optimizer.beta2=1"), _none, "optimizer.beta2=1.0 must be in [0, 1)"),
    ("eps = 0", _set("optimizer.eps=0"), _none, "optimizer.eps=0.0 must be > 0"),
    ("weight decay", _set("optimizer.weight_decay=-0.1"), _none, "optimizer.weight_decay=-0.1 must be in [0, 1]"),
    ("min_lr_ratio", _set("training.min_lr_ratio=-0.1"), _none, "training.min_lr_ratio=-0.1 must be in [0, 1]"),
    ("decay_fraction", _set("training.decay_fraction=0"), _none, "training.decay_fraction=0.0 must be in (0, 1]"),
    ("rope_theta", _set("model.rope_theta=0"), _none, "model.rope_theta=0.0 must be > 0"),
    ("norm_eps", _set("model.norm_eps=0"), _none, "model.norm_eps=0.0 must be > 0"),
    ("negative seed", _set("training.seed=-1"), _none, "training.seed=-1 must not be negative"),
    ("max_tokens", _set("data.max_tokens=0"), _none, "data.max_tokens=0 must be at least 1"),
    ("warmup > steps", _set("training.warmup_steps=10", "training.steps=5"), _none, "exceeds training.steps=5"),
    ("straggler factor", _set("resilience.straggler_factor=1"), _none, "resilience.straggler_factor=1.0 must be > 1"),
    ("files without path", _set("data.source=files"), _none, "data.source=files needs data.path"),
    ("data path missing", _set("data.source=files", "data.path=/nonexistent/corpus"), _none, "does not exist"),
    ("empty corpus", [], _files(""), "every file (1) is empty"),
    ("no matching files", [], _files("text", name="a.csv"), "holds no file ending in .py, .txt, .md"),
    ("extension without dot", _set("data.extensions=py,txt"), _none, "'py' needs a leading dot"),
    ("path ignored", _set("data.path=/tmp"), _none, "is ignored by data.source='synthetic'"),
    ("tokenizer missing", _set("data.tokenizer=/nonexistent/tokenizer.json"), _none, "no such file"),
    ("tokenizer corrupt", [], _tokenizer(None), "is not a valid tokenizer.json"),
    ("vocab too large", [], _tokenizer(300), "has 300 tokens but model.vocab_size=256"),
    ("no gpu", _set("training.device=cuda"), _none, "training.device=cuda but no CUDA device is visible"),
    ("run dir is a file", [], _run_dir_file, "is a file, not a folder"),
    ("run dir unwritable", [], _under_a_file, "cannot be written"),
    ("run dir holds a run", [], _held_run, "already holds a run (metrics.jsonl up to step 3)"),
    (
        "pp_chunks without pp",
        _set("parallel.pp_chunks=2"),
        _none,
        "parallel.pp_chunks=2 has no effect with parallel.pp=1",
    ),
    ("schedule without pp", _set("parallel.pp_schedule=zb-h1"), _none, "has no effect with parallel.pp=1"),
    ("world size", ["--nproc", "3", *_set("parallel.dp_shard=2")], _none, "world size is 3"),
    ("heads vs tp", ["--nproc", "2", *_set("parallel.tp=2", "model.n_kv_heads=1")], _none, "must divide model.n_heads"),
    (
        "batch arithmetic",
        ["--nproc", "2", *_set("training.global_batch=10", "training.grad_accum=2")],
        _none,
        "set training.global_batch=8",
    ),
    ("seq_len", _set("training.seq_len=128"), _none, "exceeds model.max_seq_len=64"),
    ("compile mode", _set("training.compile=full"), _none, "training.compile='full' is not one of none, blocks, model"),
    (
        "compile with cp",
        ["--nproc", "2", *_set("training.compile=blocks", "parallel.cp=2")],
        _none,
        "training.compile=blocks is not supported with parallel.cp=2",
    ),
    (
        "compile model with zero-3",
        ["--nproc", "2", *_set("training.compile=model", "parallel.zero_stage=3")],
        _none,
        "training.compile=model is not supported with parallel.zero_stage=3",
    ),
    ("zero stage", _set("parallel.zero_stage=4"), _none, "parallel.zero_stage=4 must be 0, 1, 2 or 3"),
    ("offload without zero", _set("parallel.offload=true"), _none, "needs parallel.zero_stage >= 1"),
    (
        "tied with pp",
        ["--nproc", "2", *_set("parallel.pp=2", "model.tie_embeddings=true")],
        _none,
        "tie_embeddings=true is not supported with parallel.pp > 1",
    ),
    (
        "ep without experts",
        ["--nproc", "2", *_set("parallel.ep=2")],
        _none,
        "parallel.ep=2 splits experts, but model.n_experts=0",
    ),
    (
        "zigzag divisibility",
        ["--nproc", "2", *_set("parallel.cp=2", "training.seq_len=30")],
        _none,
        "training.seq_len=30 must be divisible by 2*cp (zigzag: each rank holds 2 chunks) = 4",
    ),
    (
        "ulysses heads",
        ["--nproc", "4", *_set("parallel.cp=4", "parallel.cp_mode=ulysses")],
        _none,
        "model.n_kv_heads=2 must be divisible by it; use cp_mode=ring",
    ),
    ("cp_mode without cp", _set("parallel.cp_mode=ulysses"), _none, "has no effect with parallel.cp=1"),
    ("negative restarts", ["--max-restarts", "-1"], _none, "--max-restarts -1 must not be negative"),
    ("no processes", ["--nproc", "0"], _none, "must be at least 1"),
    ("node rank", ["--nnodes", "2", "--node-rank", "2"], _none, "--node-rank 2 must be in 0 .. --nnodes-1 = 1"),
    (
        "1-bit Adam with ZeRO",
        ["--nproc", "2", *_set("optimizer.name=onebit_adam", "optimizer.freeze_step=2", "parallel.zero_stage=1")],
        _none,
        "optimizer.name=onebit_adam with parallel.zero_stage=1 is not supported",
    ),
    (
        "islands do not divide the world",
        ["--nproc", "3", *_set("parallel.diloco=2")],
        _none,
        "world size 3 is not divisible by parallel.diloco=2",
    ),
    (
        "fragments do not divide H",
        ["--nproc", "2", *_set("parallel.diloco=2", "diloco.inner_steps=4", "diloco.fragments=3")],
        _none,
        "diloco.fragments=3 must divide diloco.inner_steps=4",
    ),
    (
        "zb-v on one chunk",
        ["--nproc", "2", *_set("parallel.pp=2", "parallel.pp_schedule=zb-v")],
        _none,
        "runs two chunks per rank (a V), but parallel.pp_chunks=1; set parallel.pp_chunks=2",
    ),
    (
        "slices without terapipe",
        ["--nproc", "2", *_set("parallel.pp=2", "parallel.pp_slices=4")],
        _none,
        "parallel.pp_slices=4 needs parallel.pp_schedule=terapipe",
    ),
    (
        "2bw resuming",
        ["--nproc", "2", *_set("parallel.pp=2", "parallel.pp_schedule=2bw")],
        _none,
        "checkpoint.resume='auto' is not supported with parallel.pp_schedule=2bw (its stashed weight version",
    ),
    (
        "async tp without sp",
        ["--nproc", "2", *_set("parallel.tp=2", "parallel.async_tp=true")],
        _none,
        "parallel.async_tp=true needs parallel.tp > 1 and parallel.sequence_parallel=true",
    ),
]


def test_the_table_covers_at_least_thirty_classes() -> None:
    assert len({fragment for *_, fragment in CASES}) >= 30


@pytest.mark.parametrize("args, setup, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_anything_starts(
    args: list[str], setup: Setup, fragment: str, tmp_path: Path
) -> None:
    extra = setup(tmp_path)
    run_dir = tmp_path / "run"
    before = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None
    base = ["train", "--config", str(TINY), "--run-dir", str(run_dir)]
    if "--config" in args:
        base = ["train", "--run-dir", str(run_dir)]
    proc = cli(*base, *args, *extra, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    after = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None
    assert after == before  # nothing was created or written
