"""The checkpoint store: `bios://` path parsing, exact save/load round trips, overwrites that
replace a checkpoint as a whole (never half, never a gap a reader can fall into), list and delete."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from bios.backend import AdapterSpec, AdapterState
from bios.catalog import BUILTIN_MODELS
from bios.engine import checkpoints
from bios.engine.checkpoints import CheckpointStore, checkpoint_path
from bios.engine.peft import read_peft_adapter
from bios.errors import InvalidRequestError, NotFoundError
from bios.validation import parse_path
from bios.weights import lora_shapes

SPEC = AdapterSpec(
    "adapter-1", "bios/tiny", rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"), dropout=0.25, seed=7
)
SHAPES = {
    "layers.0.q_proj.A": (64, 2),
    "layers.0.q_proj.B": (2, 64),
    "layers.0.v_proj.A": (64, 2),
    "layers.0.v_proj.B": (2, 32),
}
TINY = BUILTIN_MODELS["bios/tiny"]
TINY_SHAPES = lora_shapes(TINY, SPEC.target_modules, SPEC.rank)
"""A sampler snapshot is also exported for PEFT, which needs real factor names of a real model."""


def make_state(
    seed: int, step: int, *, moments: bool = True, shapes: dict[str, tuple[int, int]] = SHAPES
) -> AdapterState:
    """A state whose every float64 value depends on `seed` (values chosen to stress exactness)."""
    rng = np.random.default_rng(seed)
    draw = lambda: {k: rng.normal(size=s) * 10.0 ** rng.integers(-30, 30, size=s) for k, s in shapes.items()}
    weights = draw()
    return AdapterState(
        spec=SPEC, step=step, weights=weights, adam_m=draw() if moments else {}, adam_v=draw() if moments else {}
    )


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == np.float64, key
        np.testing.assert_array_equal(got[key], want[key])


def hidden_entries(store: CheckpointStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob(".*"))


# ---- parse_path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("bios://session-abc/weights/step-10", ("session-abc", "state", "step-10")),
        ("bios://S/sampler_weights/final", ("S", "sampler", "final")),
        ("bios://S/weights/a.b_c-d", ("S", "state", "a.b_c-d")),
    ],
)
def test_parse_path_accepts_both_kinds(path: str, expected: tuple[str, str, str]) -> None:
    assert parse_path(path) == expected
    assert checkpoint_path(*expected) == path


@pytest.mark.parametrize(
    "path",
    [
        "S/weights/N",  # no scheme
        "tinker://S/weights/N",  # another scheme
        "bios://S/optimizer/N",  # unknown kind
        "bios://S/weights",  # too short
        "bios://S/weights/N/extra",  # too long
        "bios://S/weights/",  # empty name
        "bios:///weights/N",  # empty session
        "bios://../weights/N",  # parent directory
        "bios://S/weights/..",
        "bios://S/weights/.",
        "bios://S/weights/.N.old.abc123",  # the store's own hidden staging/retired directories
        "",
        None,
        42,
    ],
)
def test_parse_path_rejects_other_forms(path: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_path(path)
    assert info.value.field == "path"
    assert "bios://SESSION/weights/NAME" in info.value.message


# ---- save / record / load -----------------------------------------------------------------


def test_save_then_record_and_load_round_trip_exactly(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = make_state(1, step=5)
    record = store.save(state, "sess", "state", "ckpt", {"note": "hi", "n": [1, 2.5, None, True]})
    assert record.path == "bios://sess/weights/ckpt"
    assert (record.name, record.kind, record.step, record.base_model) == ("ckpt", "state", 5, "bios/tiny")
    assert record.metadata == {"note": "hi", "n": [1, 2.5, None, True]}
    assert store.record(record.path) == record
    loaded = store.load(record.path, "new-id")
    assert loaded.spec == AdapterSpec("new-id", "bios/tiny", 2, 4.0, ("q_proj", "v_proj"), 0.25, 7)
    assert loaded.step == 5
    assert_same_tensors(loaded.weights, state.weights)
    assert_same_tensors(loaded.adam_m, state.adam_m)
    assert_same_tensors(loaded.adam_v, state.adam_v)
    assert (tmp_path / "sess" / "weights" / "ckpt" / "adapter.safetensors").is_file()


def test_sampler_checkpoints_keep_weights_only(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = make_state(2, step=3, shapes=TINY_SHAPES)
    record = store.save(state, "sess", "sampler", "snap", {}, TINY)
    assert record.path == "bios://sess/sampler_weights/snap" and record.kind == "sampler"
    loaded = store.load(record.path, "x")
    assert_same_tensors(loaded.weights, state.weights)
    assert loaded.adam_m == {} and loaded.adam_v == {}
    peft_dir = store.peft_directory(record.path)
    assert peft_dir == tmp_path / "sess" / "sampler_weights" / "snap" / "peft"
    lora, weights = read_peft_adapter(peft_dir, TINY)  # the PEFT export holds the same weights, as float32
    assert (lora.rank, lora.alpha, lora.target_modules, lora.dropout) == (2, 4.0, ("q_proj", "v_proj"), 0.25)
    assert all(np.array_equal(weights[k], v.astype(np.float32)) for k, v in state.weights.items())


def test_sampler_checkpoints_need_the_model_and_training_states_have_no_peft_export(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="ModelSpec"):
        store.save(make_state(2, step=3, shapes=TINY_SHAPES), "sess", "sampler", "snap", {})
    assert store.list() == [] and hidden_entries(store) == []
    record = store.save(make_state(2, step=3), "sess", "state", "full", {})
    assert not (tmp_path / "sess" / "weights" / "full" / "peft").exists()
    with pytest.raises(NotFoundError) as info:
        store.peft_directory(record.path)
    assert info.value.field == "path"


def test_unknown_checkpoint_is_not_found(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for call in (store.record, lambda p: store.load(p, "x"), store.delete):
        with pytest.raises(NotFoundError) as info:
            call("bios://nobody/weights/nothing")
        assert info.value.field == "path"
        assert "bios://nobody/weights/nothing" in info.value.message


def test_overwrite_with_the_same_name_replaces_the_whole_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    first = store.save(make_state(3, step=1), "sess", "state", "latest", {"v": 1})
    wider = {**SHAPES, "layers.1.q_proj.A": (64, 2), "layers.1.q_proj.B": (2, 64)}
    narrower = {k: SHAPES[k] for k in ("layers.0.q_proj.A", "layers.0.q_proj.B")}
    store.save(make_state(4, step=2, shapes=wider), "sess", "state", "latest", {"v": 2})
    new = make_state(5, step=3, shapes=narrower)
    third = store.save(new, "sess", "state", "latest", {"v": 3})
    assert third.id != first.id
    assert store.record(first.path) == third
    loaded = store.load(first.path, "x")
    assert loaded.step == 3
    assert_same_tensors(loaded.weights, new.weights)  # nothing left over from the wider state
    assert_same_tensors(loaded.adam_v, new.adam_v)
    assert [r.metadata for r in store.list("sess")] == [{"v": 3}]
    assert hidden_entries(store) == []  # no staging or retired directories remain


def test_a_failed_write_leaves_the_old_checkpoint_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    old = make_state(6, step=4)
    record = store.save(old, "sess", "state", "keep", {"v": "old"})

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints, "write_tensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save(make_state(7, step=9), "sess", "state", "keep", {"v": "new"})
    assert store.record(record.path) == record
    assert_same_tensors(store.load(record.path, "x").weights, old.weights)
    assert hidden_entries(store) == []  # the half-written staging directory was removed


class _WatchedLock:
    """Wraps the store's lock and reports when another thread has to wait for it."""

    def __init__(self, inner: object, contended: threading.Event) -> None:
        self._inner, self._contended = inner, contended

    def __enter__(self) -> _WatchedLock:
        if not self._inner.acquire(blocking=False):  # type: ignore[attr-defined]
            self._contended.set()
            self._inner.acquire()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.release()  # type: ignore[attr-defined]


def test_a_reader_during_an_overwrite_sees_the_old_or_the_new_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pause the overwrite after its first rename; a reader in another thread then either
    finishes (and must have seen a whole checkpoint) or is made to wait until the swap is over."""
    store = CheckpointStore(tmp_path)
    store.save(make_state(8, step=1), "sess", "state", "live", {})
    path = "bios://sess/weights/live"
    progress = threading.Event()  # the reader finished, or is blocked until the swap ends
    monkeypatch.setattr(checkpoints, "_LOCK", _WatchedLock(checkpoints._LOCK, progress), raising=False)
    real_replace, seen, readers = os.replace, [], []

    def read() -> None:
        try:
            seen.append(CheckpointStore(tmp_path).record(path).step)
        except NotFoundError:
            seen.append("missing")
        progress.set()

    def replace(src: object, dst: object) -> None:
        real_replace(src, dst)
        if not readers:  # the old directory has just been moved away
            readers.append(threading.Thread(target=read))
            readers[0].start()
            progress.wait()

    monkeypatch.setattr(checkpoints.os, "replace", replace)
    store.save(make_state(9, step=2), "sess", "state", "live", {})
    readers[0].join()
    assert seen == [2] or seen == [1]
    assert store.record(path).step == 2


# ---- list / delete ------------------------------------------------------------------------


def test_list_is_oldest_first_and_filters_by_session(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.list() == []
    a = store.save(make_state(10, 1), "s1", "state", "a", {})
    b = store.save(make_state(11, 2, shapes=TINY_SHAPES), "s2", "sampler", "b", {}, TINY)
    c = store.save(make_state(12, 3, shapes=TINY_SHAPES), "s1", "sampler", "c", {}, TINY)
    assert [r.path for r in store.list()] == [a.path, b.path, c.path]
    assert [r.path for r in store.list("s1")] == [a.path, c.path]
    assert store.list("nobody") == []


def test_delete_removes_exactly_one_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    keep = store.save(make_state(13, 1), "s", "state", "keep", {})
    gone = store.save(make_state(14, 2), "s", "state", "gone", {})
    store.delete(gone.path)
    assert [r.path for r in store.list()] == [keep.path]
    assert not (tmp_path / "s" / "weights" / "gone").exists()
    with pytest.raises(NotFoundError):
        store.record(gone.path)
    with pytest.raises(NotFoundError) as info:
        store.delete(gone.path)
    assert info.value.field == "path"
    with pytest.raises(InvalidRequestError):
        store.delete("bios://s/weights/../keep")
    assert store.record(keep.path) == keep


def test_an_orbax_store_round_trips_exactly_and_any_store_reads_it(tmp_path):
    spec = AdapterSpec("a", "bios/tiny", rank=2, alpha=4.0, target_modules=("q_proj",))
    weights = {
        "model.layers.0.self_attn.q_proj.lora_A": np.random.default_rng(0).standard_normal((64, 2)),
        "model.layers.0.self_attn.q_proj.lora_B": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32),
    }
    state = AdapterState(
        spec=spec,
        step=7,
        weights=weights,
        adam_m={k: v * 2 for k, v in weights.items()},
        adam_v={k: v * v for k, v in weights.items()},
    )
    record = CheckpointStore(tmp_path, "orbax").save(state, "sess", "state", "orb", {"k": 1})
    assert (tmp_path / "sess" / "weights" / "orb" / "orbax").is_dir()
    assert not (tmp_path / "sess" / "weights" / "orb" / "adapter.safetensors").exists()
    loaded = CheckpointStore(tmp_path).load(record.path, "b")  # a default (safetensors) store reads it too
    assert loaded.step == 7 and loaded.spec.adapter_id == "b"
    for group in ("weights", "adam_m", "adam_v"):
        for name, value in getattr(state, group).items():
            assert getattr(loaded, group)[name].dtype == value.dtype
            assert np.array_equal(getattr(loaded, group)[name], value)
