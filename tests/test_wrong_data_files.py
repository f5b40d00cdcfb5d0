"""Data files never serve wrong data silently.  A null at any depth, a damaged Arrow or Parquet
file, a string that is not UTF-8, and a data file that leads out of its directory (a Hugging
Face ``state.json`` entry, a symlink in an image folder or a directory of ``.npy`` or Parquet
files, a file swapped for a link after it was listed) stop the start with exit code 2 and one
line naming the file and what to do.  What no check can see (a flipped bit inside the numbers
of an Arrow IPC file, which has no checksums) is served exactly as pyarrow reads it: never a
crash, never a failed batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import check_stopped, make_rows

import batchfeed
from batchfeed import Client, DatasetError
from batchfeed.launch import ServerProcess
from batchfeed.server.dataset import SharedDataset
from batchfeed.server.sources import inspect_source

pa = pytest.importorskip("pyarrow", reason="pyarrow is the [arrow] extra")
pq = pytest.importorskip("pyarrow.parquet")


def start_or_refusal(*args: object) -> tuple[ServerProcess | None, int | None, list[str]]:
    """Start ``batchfeed serve`` (one worker): (the ready server, None, []) or, when it exited
    instead, (None, its exit code, its output lines)."""
    srv = ServerProcess([*map(str, args), "--workers", "1"], bind="tcp://127.0.0.1:0")
    try:
        return srv.start(timeout=60), None, []
    except RuntimeError:
        pass
    # Segments of other servers that were SIGKILLed are removed at start, with a warning.
    lines = [line for line in srv.output if "left by dead servers" not in line]
    return None, srv.proc.returncode if srv.proc else None, lines


def refusal(*args: object) -> str:
    """The one line with which ``batchfeed serve`` refused to start (exit code 2)."""
    srv, code, lines = start_or_refusal(*args)
    if srv is not None:
        check_stopped(srv, srv.stop())
        pytest.fail(f"the server started: {srv.ready_line}")
    assert code == 2 and len(lines) == 1, f"exit code {code}:\n" + "\n".join(lines)
    assert lines[0].startswith("batchfeed serve: error: "), lines[0]
    return lines[0]


def load(path: Path) -> None:
    """Inspect and load a dataset in process, as the server's start does (then free it)."""
    SharedDataset.load("t", inspect_source(str(path)), "test").close()


def write_ipc(path: Path, table, batch_rows: int | None = None) -> Path:
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)
    return path


def invalid_utf8_strings() -> object:
    """A string column whose second row is b'\\xff\\xfe': its structure is fine (a cheap
    ``validate()`` passes), only a full validation sees that it is not UTF-8."""
    offsets = pa.py_buffer(np.array([0, 2, 4, 6], np.int32))
    return pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"ok\xff\xfeok")])


# ---------------------------------------------------------------------------------------------
# Nulls at any depth


def test_a_null_inside_a_parquet_list_is_refused_at_start_naming_column_and_row(
        tmp_path: Path) -> None:
    """Served as [4, -9223372036854775808, 6] before, with only a numpy warning."""
    path = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2], "tokens": pa.array(
        [[1, 2], [3], [4, None, 6]], pa.list_(pa.int64()))}), path)
    line = refusal("--data", path)
    assert "tokens.parquet: column 'tokens' has a null in row 2 " in line, line
    assert "fill or drop them" in line and "pyarrow.compute.fill_null / drop_null" in line


def _struct_with_null_bytes() -> object:
    return pa.StructArray.from_arrays(
        [pa.array([b"a", None, b"c"]), pa.array(["a.jpg", "b.jpg", "c.jpg"])],
        names=["bytes", "path"])


NULLS = {
    "inside a list<int32>": (lambda: pa.array([[1], [2, None]], pa.list_(pa.int32())), 1),
    "inside a nested fixed-size list": (
        lambda: pa.array([[[1.0, 2.0]], [], [[3.0, 4.0], [5.0, None]]],
                         pa.list_(pa.list_(pa.float32(), 2))), 2),
    "inside a fixed-size list": (lambda: pa.array([[1, 2], [3, 4], [None, 6]],
                                                  pa.list_(pa.int64(), 2)), 2),
    "in a struct's bytes (a Hugging Face Image)": (_struct_with_null_bytes, 1),
    "among a dictionary's values": (
        lambda: pa.DictionaryArray.from_arrays(pa.array([0, 0, 1, 0], pa.int32()),
                                               pa.array(["a", None])), 2),
}


@pytest.mark.parametrize("case", sorted(NULLS))
def test_a_null_at_any_depth_is_refused_naming_the_first_row(case: str, tmp_path: Path) -> None:
    make, row = NULLS[case]
    column = make()
    n = len(column)
    table = pa.table({"id": np.arange(n), "c": column})
    path = write_ipc(tmp_path / "nulls.arrow", table)
    with pytest.raises(DatasetError, match=rf"nulls\.arrow: column 'c' has a null in row {row} "
                       r".*fill or drop them"):
        load(path)
    with pytest.raises(DatasetError, match=rf"column 'c' has a null in row {row} "):
        batchfeed.serve(table)


def test_the_row_named_counts_the_record_batches_before_it(tmp_path: Path) -> None:
    """Two record batches of 3 rows: the null is in the second one's row 1, row 4 in all."""
    tokens = pa.array([[1], [2], [3], [4], [5, None], [6]], pa.list_(pa.int32()))
    path = write_ipc(tmp_path / "two.arrow", pa.table({"tokens": tokens}), batch_rows=3)
    with pytest.raises(DatasetError, match=r"column 'tokens' has a null in row 4 \(1 row holds"):
        load(path)


# ---------------------------------------------------------------------------------------------
# Damaged Arrow and Parquet files


FLIPS = 24


def flip_table(n: int = 200) -> object:
    ids = np.arange(n)
    return pa.table({
        "id": ids,
        "x": (ids / 2).astype(np.float32),
        "tokens": pa.array([list(range(i % 7)) for i in ids], pa.list_(pa.int32())),
        "emb": pa.array([[float(i), -1.0] for i in ids], pa.list_(pa.float32(), 2)),
        "text": [f"row {i} " + "é" * (i % 3) for i in ids],
        "blob": pa.array([bytes([i % 256]) * (i % 5) for i in ids], pa.binary()),
    })


def read_as_pyarrow(path: Path) -> object:
    """The table pyarrow reads from an IPC file (or stream), as the server opens it."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def assert_served_as_read(address: str, table) -> None:
    """Every row served, flat, in file order, equals what pyarrow read: bit for bit."""
    with Client(address, batch_size=len(table), shuffle="none", ragged="flat") as client:
        batches = list(client.epoch(0))
    assert len(batches) == 1
    batch = batches[0]
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        typ = column.type
        if pa.types.is_string(typ):
            assert batch[name] == column.to_pylist(), name
        elif pa.types.is_binary(typ):  # flat: the values and offsets
            rows = [bytes(batch[name][a:b]) for a, b in zip(batch[f"{name}_offsets"][:-1],
                                                            batch[f"{name}_offsets"][1:])]
            assert rows == column.to_pylist(), name
        elif pa.types.is_list(typ):
            assert batch[name].tobytes() == column.flatten().to_numpy().tobytes(), name
            offsets = column.offsets.to_numpy()
            assert batch[f"{name}_offsets"].tolist() == (offsets - offsets[0]).tolist(), name
        elif pa.types.is_fixed_size_list(typ):
            assert batch[name].tobytes() == column.flatten().to_numpy().tobytes(), name
        else:
            assert batch[name].tobytes() == column.to_numpy().tobytes(), name


@pytest.mark.slow
def test_each_byte_flipped_arrow_file_is_refused_or_served_exactly_as_pyarrow_reads_it(
        tmp_path: Path) -> None:
    """24 copies of an Arrow IPC file, each with one byte flipped at evenly spread places
    (metadata, offsets, numbers, strings).  Before, some started and then failed every batch
    with a traceback, some sent strings that are not UTF-8 (killing the client's I/O thread),
    some served offsets out of range.  Now each is refused at start in one line, or served
    exactly as pyarrow reads it (every other half through --mmap), with no batch failing."""
    good = write_ipc(tmp_path / "good.arrow", flip_table()).read_bytes()
    refused, served, changed = [], [], 0
    for k in range(FLIPS):
        at = 5 + k * (len(good) - 10) // (FLIPS - 1)
        data = bytearray(good)
        data[at] ^= 0xFF
        path = tmp_path / f"flip{k}.arrow"
        path.write_bytes(bytes(data))
        mmap = ("--mmap",) if k % 2 else ()
        srv, code, lines = start_or_refusal("--data", path, *mmap)
        if srv is None:
            assert code == 2 and len(lines) == 1, f"byte {at}: exit {code}:\n" + "\n".join(lines)
            assert lines[0].startswith("batchfeed serve: error: ") and "Traceback" not in lines[0]
            refused.append(at)
            continue
        try:
            table = read_as_pyarrow(path)  # what the server served must be readable
            assert_served_as_read(srv.address, table)
            changed += not table.equals(flip_table())
        finally:
            check_stopped(srv, srv.stop())
        served.append(at)
    assert len(refused) + len(served) == FLIPS
    assert refused and served and changed, (refused, served, changed)


def test_a_column_that_is_not_valid_arrow_is_refused_as_damaged(tmp_path: Path) -> None:
    """Offsets that run past the values: a damaged file that pyarrow opens without a word."""
    good = write_ipc(tmp_path / "good.arrow", flip_table(50))
    table = read_as_pyarrow(good)
    text = table.column("text").chunk(0)
    offsets = text.buffers()[1].to_pybytes()
    at = good.read_bytes().find(offsets)  # the text column's offsets in the file
    assert at > 0
    data = bytearray(good.read_bytes())
    data[at + 4 * 25 + 3] ^= 0x40  # offset 25 jumps far past the string data
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(bytes(data))
    read_as_pyarrow(bad)  # pyarrow opens it
    with pytest.raises(DatasetError, match=r"bad\.arrow: column 'text' is not valid Arrow data "
                       r"\(.*\); the file is damaged: re-create it"):
        load(bad)


def test_a_flipped_bit_in_a_parquet_file_with_page_checksums_is_refused(tmp_path: Path) -> None:
    """Written with page checksums, one flipped bit served row 500 as 501 before."""
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": np.arange(1000)}), path, write_page_checksum=True,
                   compression="none", use_dictionary=False)
    data = bytearray(path.read_bytes())
    data[data.find(np.int64(500).tobytes())] ^= 1
    path.write_bytes(bytes(data))
    assert pq.read_table(path).column("id")[500].as_py() == 501  # what a plain read gives
    line = refusal("--data", path)
    assert "ids.parquet" in line and "column 'id'" in line, line
    assert "CRC" in line and line.endswith("the file is damaged: re-create it"), line


def test_without_checksums_a_flipped_number_is_served_as_pyarrow_reads_it(serve,
                                                                          tmp_path: Path) -> None:
    """The limit: a number changed in a file without checksums cannot be seen; it is served
    as pyarrow reads it (501), and the batch does not fail."""
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": np.arange(1000)}), path, compression="none",
                   use_dictionary=False)
    data = bytearray(path.read_bytes())
    data[data.find(np.int64(500).tobytes())] ^= 1
    path.write_bytes(bytes(data))
    srv = serve("--data", path, "--workers", 1)
    with Client(srv.address, batch_size=1000, shuffle="none") as client:
        ids = next(iter(client.epoch(0)))["id"]
    assert ids[500] == 501 and ids.tolist() == pq.read_table(path).column("id").to_pylist()


@pytest.mark.parametrize("kind", ["arrow", "arrow --mmap", "parquet"])
def test_a_string_column_that_is_not_utf8_never_reaches_a_client(kind: str,
                                                                 tmp_path: Path) -> None:
    """Its structure validates (offsets, lengths): only the full check sees the bytes.  Before,
    the server started and the client's I/O thread died of a UnicodeDecodeError."""
    table = pa.table({"id": [0, 1, 2], "text": invalid_utf8_strings()})
    table.validate()  # fine at a glance
    with pytest.raises(pa.ArrowInvalid, match="UTF8"):
        table.validate(full=True)
    if kind.startswith("arrow"):
        path = write_ipc(tmp_path / "text.arrow", table)
    else:
        path = tmp_path / "text.parquet"
        pq.write_table(table, path)  # Parquet writes and reads the bytes as they are
    line = refusal("--data", path, *kind.split()[1:])
    assert f"{path.name}: column 'text' is not valid Arrow data (" in line, line
    assert "UTF8" in line and line.endswith("the file is damaged: re-create it"), line


def test_an_in_memory_table_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(DatasetError, match=r"column 'text' is not valid Arrow data .*UTF8.*"
                       "the table is damaged: build it again"):
        batchfeed.serve(pa.table({"text": invalid_utf8_strings()}))


# ---------------------------------------------------------------------------------------------
# Data files stay inside their directory


def hf_dir(root: Path, filenames: list[str]) -> Path:
    """A save_to_disk directory whose state.json names ``filenames``."""
    root.mkdir(parents=True)
    (root / "dataset_info.json").write_text("{}")
    (root / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": name} for name in filenames]}))
    return root


def ipc_stream(path: Path, ids) -> Path:
    table = pa.table({"id": ids})
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.mark.parametrize("how", ["../../x.arrow", "absolute", "a link out"])
def test_a_hugging_face_data_file_outside_its_directory_is_refused(how: str,
                                                                   tmp_path: Path) -> None:
    """state.json named ../../x.arrow or /abs/x.arrow, and it was served from there."""
    (tmp_path / "a").mkdir()
    outside = ipc_stream((tmp_path / "a" if how == "../../x.arrow" else tmp_path) / "x.arrow",
                         [7, 7, 7])
    root = tmp_path / "a" / "b" / "hf"  # ../../x.arrow is tmp_path/a/x.arrow
    if how == "a link out":
        hf_dir(root, ["data-00000.arrow"])
        (root / "data-00000.arrow").symlink_to(outside)
        entry = str(root / "data-00000.arrow")
    else:
        entry = "../../x.arrow" if how == "../../x.arrow" else str(outside)
        hf_dir(root, [entry])
    line = refusal("--data", root)
    assert entry in line, line
    assert "again with save_to_disk" in line or "copy the file in" in line, line


def test_a_hugging_face_data_file_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "hf", ["data-00000-of-00001.arrow"])
    with pytest.raises(DatasetError, match=r"names the data file 'data-00000-of-00001\.arrow', "
                       "which does not exist; save the dataset again"):
        inspect_source(str(root))


IMAGE = b"\xff\xd8\xff\xe0 not decoded without a transform"


def image_folder(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.jpg").write_bytes(IMAGE + f" {cls}{i}".encode())
    return root


def test_an_image_link_out_of_the_folder_is_refused_naming_it(tmp_path: Path) -> None:
    """cat/b.jpg -> a secret outside the folder was served to clients as an image's bytes."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:$6$hash")
    root = image_folder(tmp_path / "images")
    (root / "cat" / "b.jpg").symlink_to(secret)
    line = refusal("--data", root)
    assert f"{root / 'cat' / 'b.jpg'} is a link to {secret}, outside the data directory" in line
    assert "copy the file in, or serve the folder it points into" in line


def test_an_image_class_linked_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = image_folder(tmp_path / "elsewhere")
    root = image_folder(tmp_path / "images")
    (root / "eel").symlink_to(elsewhere / "dog")
    line = refusal("--data", root)
    assert f"{root / 'eel'} is a link to {elsewhere / 'dog'}, outside" in line, line


def test_links_inside_the_image_folder_are_served(serve, tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    (root / "cat" / "2.jpg").symlink_to(Path("..") / "dog" / "0.jpg")
    (root / "eel").symlink_to("dog")
    srv = serve("--data", root, "--workers", 1)
    assert "images: 7 rows" in srv.ready_line
    with Client(srv.address, batch_size=7, shuffle="none") as client:
        batch = next(iter(client.epoch(0)))
    assert batch["path"] == ["cat/0.jpg", "cat/1.jpg", "cat/2.jpg", "dog/0.jpg", "dog/1.jpg",
                             "eel/0.jpg", "eel/1.jpg"]
    assert batch["label"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert batch["image"][2] == batch["image"][3] == batch["image"][5] == IMAGE + b" dog0"


BROKEN_LINKS = {
    "a dangling image": ("cat/b.jpg", "nowhere.jpg", "is a dangling link"),
    "an image that links to itself": ("cat/b.jpg", "b.jpg", "is a link loop"),
    "a dangling class": ("eel", "gone", "is a dangling link"),
    "a class that loops": ("eel", "eel", "is a link loop"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_LINKS))
def test_a_dangling_link_or_a_loop_in_an_image_folder_is_one_line(case: str,
                                                                 tmp_path: Path) -> None:
    name, target, words = BROKEN_LINKS[case]
    root = image_folder(tmp_path / "images")
    (root / name).symlink_to(target)
    line = refusal("--data", root)
    assert f"{root / name} {words}" in line, line


def test_an_image_swapped_for_a_link_after_listing_is_never_followed(tmp_path: Path) -> None:
    """Between the listing (inspect) and the read (load), cat/0.jpg becomes a link to a file
    of the same size outside the folder: refused, not read."""
    root = image_folder(tmp_path / "images")
    victim = root / "cat" / "0.jpg"
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * victim.stat().st_size)
    sources = inspect_source(str(root))
    victim.unlink()
    victim.symlink_to(secret)
    with pytest.raises(DatasetError, match=rf"{victim} changed after it was listed"):
        SharedDataset.load("t", sources, "test").close()


def test_an_image_replaced_by_another_file_after_listing_is_refused(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    victim = root / "dog" / "1.jpg"
    sources = inspect_source(str(root))
    other = root / "other"
    other.write_bytes(b"o" * victim.stat().st_size)
    other.replace(victim)
    with pytest.raises(DatasetError, match=rf"{victim} was replaced by another file after it "
                       "was listed"):
        SharedDataset.load("t", sources, "test").close()


def test_an_image_whose_name_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """Its ``path`` would be text that is not UTF-8 (it was a traceback at start)."""
    root = image_folder(tmp_path / "images")
    with open(os.fsencode(root / "cat") + b"/\xff\xfe.jpg", "wb") as f:
        f.write(IMAGE)
    line = refusal("--data", root)
    assert r"the image path 'cat/\xff\xfe.jpg' is not UTF-8" in line and "rename it" in line


def test_an_npy_file_whose_name_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """Its stem would be a field name that is not UTF-8 (the server started with it)."""
    root = npy_dir(tmp_path / "data")
    with open(os.fsencode(root) + b"/\xff.npy", "wb") as f:
        np.save(f, np.arange(10))
    line = refusal("--data", root)
    assert r"\xff.npy: the field name '\xff' is not UTF-8" in line and "rename it" in line


def npy_dir(root: Path) -> Path:
    root.mkdir()
    for name, arr in make_rows(10).items():
        np.save(root / f"{name}.npy", arr)
    return root


def parquet_dir(root: Path) -> Path:
    root.mkdir()
    pq.write_table(pa.table({"id": np.arange(5)}), root / "part-0.parquet")
    pq.write_table(pa.table({"id": np.arange(5, 10)}), root / "part-1.parquet")
    return root


DIRECTORIES = {
    ".npy files": (npy_dir, "zz.npy",
                   lambda p: np.save(p, np.arange(10)), "is a link to"),
    "Parquet files": (parquet_dir, "part-2.parquet",
                      lambda p: pq.write_table(pa.table({"id": np.arange(3)}), p),
                      "is a link to"),
    ".npy files, dangling": (npy_dir, "zz.npy", None, "is a dangling link"),
    "Parquet files, dangling": (parquet_dir, "part-2.parquet", None, "is a dangling link"),
}


@pytest.mark.parametrize("case", sorted(DIRECTORIES))
def test_a_directory_of_data_files_keeps_to_itself(case: str, tmp_path: Path) -> None:
    """The rule of image folders holds for every data directory: a link out of it, or to
    nothing, is one line at start."""
    make_dir, name, write_outside, words = DIRECTORIES[case]
    root = make_dir(tmp_path / "data")
    outside = tmp_path / ("outside" + Path(name).suffix)
    if write_outside is not None:
        write_outside(outside)
    (root / name).symlink_to(outside)
    line = refusal("--data", root)
    assert f"{root / name} {words}" in line, line


def test_an_npy_file_swapped_for_a_link_after_listing_is_never_followed(tmp_path: Path) -> None:
    root = npy_dir(tmp_path / "data")
    sources = inspect_source(str(root))
    victim = root / "id.npy"
    outside = tmp_path / "outside.npy"
    np.save(outside, np.full(10, 666))  # the same header and size
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(DatasetError, match=rf"{victim} changed after it was listed"):
        SharedDataset.load("t", sources, "test").close()


def test_links_inside_a_directory_of_npy_files_are_served(tmp_path: Path) -> None:
    root = npy_dir(tmp_path / "data")
    os.symlink("id.npy", root / "again.npy")
    sources = {s.field.name: s for s in inspect_source(str(root))}
    assert set(sources) == {"again", "flag", "id", "img", "x"}
    assert sources["again"].path == str((root / "id.npy").resolve())
