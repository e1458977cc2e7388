"""Sharded streams: webdataset tar shards and `datasets` streaming, split over ranks and loader workers,
resumed at the saved shard; bad records counted by key and shard; metadata.csv in image folders."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import cycle_runs
import datasets
import psutil
import pytest
import torch

from cycletune.data.shards import Shard, ShardedSource
from cycletune.data.skips import SkipLedger
from cycletune.data.source_types import SOURCE_TYPES
from cycletune.data.sources import Record, SourceResult, image_folder, shapes
from cycletune.data.streams import Stream
from cycletune.data.tar_shards import expand_braces, webdataset_shards
from cycletune.train.builders import build_streams, load_records
from cycletune.train.config import Config

# Uneven shard sizes, so rank slices, loader workers and checkpoints fall across shard boundaries.
SHARD_SIZES = (23, 9, 31, 17, 40, 12, 28, 20)
RESOLUTION = 16


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png(record: Record) -> bytes:
    buffer = io.BytesIO()
    record.image().save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, sizes: tuple[int, ...] = SHARD_SIZES) -> list[str]:
    """Shapes-world images as webdataset shards (img2dataset layout: KEY.png, KEY.txt, KEY.json); their keys."""
    folder.mkdir(parents=True, exist_ok=True)
    records = iter(shapes(sum(sizes), resolution=RESOLUTION).records)
    keys = []
    for shard, size in enumerate(sizes):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for index in range(size):
                record, key = next(records), f"{shard:05d}{index:04d}"
                add_member(tar, f"{key}.png", png(record))
                add_member(tar, f"{key}.txt", record.caption.encode())
                add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
                keys.append(key)
    return keys


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("webdataset")
    return folder, write_shards(folder)


def sharded(folder: Path) -> ShardedSource:
    return ShardedSource(tuple(webdataset_shards(str(folder / f"{{00000..{len(SHARD_SIZES) - 1:05d}}}.tar"))))


def stream(source: ShardedSource, **options) -> Stream:
    return Stream(source, **{"seed": 5, "resolution": RESOLUTION, "random_flip": True, **options})


def take(source: Stream, steps: int) -> list[dict]:
    return [source.next() for _ in range(steps)]


def test_braces_and_globs_name_the_shards(shard_folder) -> None:
    folder, _ = shard_folder
    assert expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
    by_glob = [shard.name for shard in webdataset_shards(str(folder / "*.tar"))]
    assert by_glob == [shard.name for shard in sharded(folder).shards] and len(by_glob) == len(SHARD_SIZES)
    with pytest.raises(FileNotFoundError, match="no such shard"):
        webdataset_shards(str(folder / "{00000..00099}.tar"))


def test_two_ranks_by_two_workers_split_each_step_of_one_rank_and_cover_the_epoch(shard_folder) -> None:
    folder, keys = shard_folder
    source = sharded(folder)
    steps = len(keys) // 6 + 2  # one epoch and a little: the next epoch reshuffles
    one = take(stream(source, batch_size=6), steps)
    ranks = [take(stream(source, batch_size=3, rank=r, world_size=2, num_workers=2), steps) for r in (0, 1)]
    for step, batch in enumerate(one):
        halves = ranks[0][step], ranks[1][step]
        assert not set(halves[0]["ids"]) & set(halves[1]["ids"]), "ranks must see disjoint samples"
        assert halves[0]["ids"] + halves[1]["ids"] == batch["ids"]
        assert torch.equal(torch.cat([halves[0]["pixels"], halves[1]["pixels"]]), batch["pixels"])
    order = [key for batch in one for key in batch["ids"]]
    assert sorted(order[: len(keys)]) == sorted(keys), "an epoch holds every record once"
    assert order[len(keys) :] != order[: len(order) - len(keys)], "the next epoch is reshuffled"


@dataclass(frozen=True)
class LoggedRead:
    """A shard reader that notes each read in `log`, to see which shards a stream opens."""

    shard: Shard
    log: list[str]

    def __call__(self) -> SourceResult:
        self.log.append(self.shard.name)
        return self.shard.read()


def logged(source: ShardedSource, log: list[str]) -> ShardedSource:
    return ShardedSource(tuple(Shard(shard.name, LoggedRead(shard, log)) for shard in source.shards))


def test_resume_reads_from_the_saved_shard_on_with_any_rank_count(shard_folder) -> None:
    folder, _ = shard_folder
    source = sharded(folder)
    full_walk: list[str] = []
    walked = stream(logged(source, full_walk), batch_size=8)
    uninterrupted = take(walked, 40)  # 320 positions: into the second epoch

    interrupted = stream(source, batch_size=8)
    take(interrupted, 23)
    state = json.loads(json.dumps(interrupted.state_dict()))  # saved as JSON in the checkpoint
    cursor = state["cursor"]
    assert 0 < cursor["start"] <= state["position"] == 184

    logs: list[list[str]] = [[], []]
    resumed = [stream(logged(source, logs[rank]), batch_size=4, rank=rank, world_size=2) for rank in (0, 1)]
    for rank_stream in resumed:
        rank_stream.load_state_dict(state)
    for step in range(23, 40):
        both = [rank_stream.next() for rank_stream in resumed]
        assert both[0]["ids"] + both[1]["ids"] == uninterrupted[step]["ids"]
        assert torch.equal(torch.cat([both[0]["pixels"], both[1]["pixels"]]), uninterrupted[step]["pixels"])
    # Each rank opened the saved shard first, then the shards after it as the full walk did (rank 0's last
    # positions may end a shard before rank 1's), never one before it.
    skipped = len(SHARD_SIZES) * cursor["epoch"] + cursor["ordinal"]
    assert skipped > 0
    for log in logs:
        assert log == full_walk[skipped : skipped + len(log)] and len(log) >= len(full_walk) - skipped - 1

    with pytest.raises(ValueError, match="resume with the same shards"):
        stream(ShardedSource(source.shards[:-1]), batch_size=8).load_state_dict(state)
    in_memory = Stream(shapes(8, resolution=8).records, batch_size=2, seed=5, resolution=8).state_dict()
    with pytest.raises(ValueError, match="in-memory source"):
        stream(source, batch_size=8).load_state_dict(in_memory)


def test_a_role_with_a_streaming_source_streams_its_small_sources_as_shards(shard_folder, tmp_path) -> None:
    folder, keys = shard_folder
    bad = write_bad_shard(tmp_path / "bad")
    config = Config.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "captioner": {"pretrained_model_name_or_path": "unused"},
            "generator": {"pretrained_model_name_or_path": "unused"},
            "data": {
                "resolution": RESOLUTION,
                "train_batch_size": 8,
                "paired": [
                    {"type": "webdataset", "path": f"{folder}/*.tar"},
                    {"type": "shapes", "num_samples": 6, "seed": 9},
                ],
                "image_only": [{"type": "webdataset", "path": str(bad)}],
                "image_only_ratio": 0.5,
            },
            "cycle": {"i2t2i": {"mode": "gumbel"}},
            "train": {"max_train_steps": 1, "num_validation_samples": 5},
        }
    )
    streams, skips = build_streams(config, rank=0, world_size=1)
    assert skips.total == 0, "a shard's bad rows are reported by the batches that read it, not at build time"
    epoch = [*keys, *(f"shapes:9:{index}" for index in range(6))]  # the shapes source is one more shard
    paired = [sample_id for _ in range(len(epoch) // 8 + 1) for sample_id in streams["paired"].next()["ids"]]
    assert sorted(paired[: len(epoch)]) == sorted(epoch)
    image_only = streams["image_only"].next()
    assert "captions" not in image_only and image_only["pixels"].shape[0] == 8
    # Validation takes the first records of the shards, in their order.
    records, _ = load_records(config.data.paired, "validation", RESOLUTION, limit=5)
    assert [record.id for record in records] == keys[:5]


def write_bad_shard(folder: Path) -> Path:
    """Two good samples and one of each kind of bad record."""
    folder.mkdir(parents=True, exist_ok=True)
    good = shapes(2, resolution=RESOLUTION).records
    path = folder / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for index, record in enumerate(good):
            add_member(tar, f"good{index}.png", png(record))
            add_member(tar, f"good{index}.txt", record.caption.encode())
        add_member(tar, "nocaption.png", png(good[0]))
        add_member(tar, "blank.png", png(good[0]))
        add_member(tar, "blank.txt", b"  \n")
        add_member(tar, "noimage.txt", b"a caption without its image")
        add_member(tar, "corrupt.png", b"\x89PNG not really")
        add_member(tar, "corrupt.txt", b"a red square")
    return path


def test_bad_records_in_a_shard_are_counted_by_key_and_shard(tmp_path: Path) -> None:
    path = write_bad_shard(tmp_path)
    ledger, seen = SkipLedger(), set()
    batches = take(stream(ShardedSource(tuple(webdataset_shards(str(path)))), batch_size=3), 4)
    for batch in batches:
        seen.update(batch["ids"])
        for entry in batch["bad_records"]:
            ledger.add(*entry)
    assert seen == {"good0", "good1"}
    where = {record_id: (reason, place) for record_id, reason, place in ledger.entries()}
    assert where == {
        f"{path}:nocaption": ("missing_caption", f"{path}:nocaption"),
        f"{path}:blank": ("empty_caption", f"{path}:blank"),
        f"{path}:noimage": ("missing_image", f"{path}:noimage"),
        "corrupt": ("not_an_image", f"{path}:corrupt.png"),
    }


def write_parquet_shards(folder: Path, sizes: tuple[int, ...] = (7, 5, 9)) -> list[str]:
    """A local `datasets` folder: parquet files of embedded PNG bytes and captions; the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    records = iter(shapes(sum(sizes), resolution=RESOLUTION).records)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    captions = []
    for shard, size in enumerate(sizes):
        rows = [next(records) for _ in range(size)]
        columns = {
            "image": [{"bytes": png(row), "path": None} for row in rows],
            "text": [row.caption for row in rows],
        }
        datasets.Dataset.from_dict(columns, features=features).to_parquet(
            str(folder / f"train-{shard}.parquet")
        )
        captions += columns["text"]
    return captions


def test_hf_streaming_reads_a_local_folder_shard_by_shard_and_resumes(tmp_path: Path) -> None:
    captions = write_parquet_shards(tmp_path / "data")
    settings = SOURCE_TYPES["hf"].settings.model_validate(
        {
            "type": "hf",
            "path": "parquet",
            "data_files": str(tmp_path / "data" / "*.parquet"),
            "streaming": True,
        }
    )
    shards = SOURCE_TYPES["hf"].shards(settings)
    assert [shard.name for shard in shards] == [f"parquet:train:{index}" for index in range(3)]
    source = ShardedSource(tuple(shards))
    uninterrupted = take(stream(source, batch_size=3, num_workers=2), 10)
    epoch = [caption for batch in uninterrupted[:7] for caption in batch["captions"]]
    assert sorted(epoch) == sorted(captions)
    assert uninterrupted[0]["ids"][0].startswith("parquet:train:")

    interrupted = stream(source, batch_size=3)
    take(interrupted, 4)
    resumed = stream(source, batch_size=3)
    resumed.load_state_dict(interrupted.state_dict())
    for expected in uninterrupted[4:]:
        batch = resumed.next()
        assert batch["ids"] == expected["ids"] and torch.equal(batch["pixels"], expected["pixels"])

    # A save_to_disk folder streams by its arrow files.
    saved = tmp_path / "saved"
    datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "data" / "*.parquet"), split="train"
    ).save_to_disk(str(saved))
    settings = SOURCE_TYPES["hf"].settings.model_validate(
        {"type": "hf", "path": str(saved), "streaming": True}
    )
    records, _ = load_records([settings], "paired", RESOLUTION)
    assert [record.caption for record in records] == captions

    # An image folder found through data_dir streams as well.
    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    for index, record in enumerate(shapes(3, resolution=RESOLUTION).records):
        (folder / "train" / f"{index}.png").write_bytes(png(record))
    (folder / "train" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{index}.png", "text": f"shape {index}"}) for index in range(3))
    )
    settings = SOURCE_TYPES["hf"].settings.model_validate(
        {"type": "hf", "path": "imagefolder", "data_dir": str(folder), "streaming": True}
    )
    batch = stream(ShardedSource(tuple(SOURCE_TYPES["hf"].shards(settings))), batch_size=3).next()
    assert sorted(batch["captions"]) == ["shape 0", "shape 1", "shape 2"] and batch["pixels"].shape[0] == 3


def test_metadata_csv_in_an_image_folder(tmp_path: Path) -> None:
    for index, record in enumerate(shapes(2, resolution=RESOLUTION).records):
        (tmp_path / f"{index}.png").write_bytes(png(record))
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\n0.png,"a shape, quoted"\n1.png,\n2.png,a missing file\n'
    )
    records, skips = image_folder(tmp_path)
    assert [(record.id, record.caption) for record in records] == [("0.png", "a shape, quoted")]
    assert skips.counts() == {"empty_caption": 1, "missing_file": 1}
    assert {where for _, _, where in skips.entries()} == {
        f"{tmp_path / 'metadata.csv'}:3",
        f"{tmp_path / 'metadata.csv'}:4",
    }


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_processes_two_workers_killed_and_resumed_equal_the_uninterrupted_run(
    shard_folder, tiny_models, tmp_path: Path
) -> None:
    folder, keys = shard_folder
    settings = [
        f'data.paired=[{{type: webdataset, path: "{folder}/{{00000..{len(SHARD_SIZES) - 1:05d}}}.tar"}}]',
        f"data.resolution={RESOLUTION}",
        "data.train_batch_size=4",
        "data.dataloader_num_workers=2",
        "train.max_train_steps=6",
        "train.checkpointing_steps=3",
        "train.validation_steps=null",
    ]
    uninterrupted = tmp_path / "uninterrupted"
    cycle_runs.run_cycle([*cycle_runs.tiny_overrides(tiny_models, uninterrupted), *settings], processes=2)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        cycle_runs.cycle_command(
            [*cycle_runs.tiny_overrides(tiny_models, interrupted), *settings], processes=2
        ),
        cwd=cycle_runs.REPO,
        env=cycle_runs.environment(ACCELERATE_USE_CPU="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(interrupted / "checkpoint-3" / "manifest.json", process)
    kill_tree(process)
    shutil.rmtree(interrupted / "checkpoint-6", ignore_errors=True)
    shutil.rmtree(interrupted / "export", ignore_errors=True)
    state = json.loads((interrupted / "checkpoint-3" / "trainer_state.json").read_text())["streams"]["paired"]
    assert state["cursor"]["start"] > 0, "the checkpoint should fall past the first shard"

    resume = [
        *cycle_runs.tiny_overrides(tiny_models, interrupted),
        *settings,
        "train.resume_from_checkpoint=latest",
    ]
    resumed = cycle_runs.run_cycle(resume, processes=2)
    assert f"resumed from {interrupted / 'checkpoint-3'} at step 3" in resumed.stderr
    log = cycle_runs.sample_log(interrupted)
    assert log == cycle_runs.sample_log(uninterrupted)
    ids = [sample_id for entry in log for sample_id in entry["ids"]]
    assert len(ids) == 6 * 8 and len(set(ids)) == len(ids) and set(ids) <= set(keys)
    different = cycle_runs.differing_tensors(
        cycle_runs.exported_weights(uninterrupted), cycle_runs.exported_weights(interrupted)
    )
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it: torch's launcher starts each rank in a session of
    its own, so a rank would outlive its launcher (and write the next checkpoint) if only that were killed."""
    launcher = psutil.Process(process.pid)
    tree = [launcher, *launcher.children(recursive=True)]
    for member in tree:
        member.kill()
    psutil.wait_procs(tree)
    process.wait()
