import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.data.sources import SourceStats, expand_sources, read_documents
from lmforge.errors import DataError


def read(paths, text_field="text", chunk_chars=0, strict=False):
    stats = SourceStats()
    docs = list(
        read_documents(paths, text_field=text_field, chunk_chars=chunk_chars, stats=stats, strict=strict)
    )
    return docs, stats


def test_text_chunks_concatenate_back_to_the_file(tmp_path, shared):
    for name in ("tinyshakespeare.txt", "en/pg1342_pride_and_prejudice.txt"):  # LF; CRLF with a BOM
        path = shared / name
        raw = path.read_bytes()[:300_000]
        small = tmp_path / path.name
        small.write_bytes(raw)
        docs, stats = read([small], chunk_chars=4000)
        assert "".join(d.text for d in docs) == raw.decode("utf-8")
        assert len(docs) > 30 and all(d.text.endswith("\n") for d in docs[:-1])
        assert max(len(d.text) for d in docs[:-1]) < 4000 + 5000  # cut at the first blank line after 4000
        assert stats.invalid_utf8_files == 0
    whole, _ = read([small], chunk_chars=0)
    assert len(whole) == 1 and whole[0].text == raw.decode("utf-8")


def test_jsonl_plain_gz_zst_and_json_array_give_the_same_documents(tmp_path):
    records = [{"text": f"doc {i} 你好 😀", "n": i} for i in range(50)]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    (tmp_path / "a.jsonl").write_bytes(body)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "e.json.gz").write_bytes(gzip.compress(body))  # JSON Lines under a .json name
    expected = [r["text"] for r in records]
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.json", "e.json.gz"):
        docs, stats = read([tmp_path / name])
        assert [d.text for d in docs] == expected, name
        assert stats.malformed_records == 0
    assert read([tmp_path / "a.jsonl"])[0][3].origin.endswith("a.jsonl:4")


def test_parquet_and_save_to_disk_folders(tmp_path):
    texts = [f"row {i} ünïcode" for i in range(30)]
    table = pa.table({"id": list(range(30)), "content": texts})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=7)
    docs, _ = read([tmp_path / "x.parquet"], text_field="content")
    assert [d.text for d in docs] == texts
    # the layout of datasets' save_to_disk: state.json + data-0000N-of-0000M.arrow (Arrow IPC streams)
    ds = tmp_path / "hf_ds"
    ds.mkdir()
    files = []
    for i, part in enumerate((table.slice(0, 12), table.slice(12))):
        name = f"data-{i:05d}-of-00002.arrow"
        with pa.OSFile(str(ds / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part, max_chunksize=5)
        files.append({"filename": name})
    (ds / "state.json").write_text(json.dumps({"_data_files": files, "_split": "train"}))
    (ds / "dataset_info.json").write_text(json.dumps({"features": {}}))
    assert expand_sources([str(tmp_path)]) == [ds, tmp_path / "x.parquet"]
    docs, _ = read([ds], text_field="content")
    assert [d.text for d in docs] == texts
    with pytest.raises(DataError, match=r"no column 'text' \(found: id, content\)"):
        read([ds])


def test_binary_skipped_invalid_utf8_replaced_and_counted(tmp_path):
    (tmp_path / "blob.dat").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (tmp_path / "model.bin").write_bytes(b"abc")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end, real \xef\xbf\xbd kept")
    docs, stats = read(expand_sources([str(tmp_path)]))
    assert len(stats.binary_skipped) == 2
    assert [d.text for d in docs] == ["caf\ufffd ok \ufffd\ufffd end, real \ufffd kept"]
    assert stats.invalid_utf8_files == 1 and stats.invalid_utf8_chars == 3


def test_malformed_jsonl_line_is_reported_and_skipped_or_fatal_with_strict(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n[1, 2]\n{"other": 1}\n{"text": 5}\n\n{"text": "c"}\n')
    docs, stats = read([path])
    assert [d.text for d in docs] == ["a", "c"]
    assert stats.malformed_records == 4
    assert stats.malformed_examples[0].startswith(f"{path}:2: malformed JSON")
    assert "no field 'text' (found: other)" in stats.malformed_examples[2]
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        read([path], strict=True)


def test_missing_text_field_names_the_keys_found(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"no field 'text' \(found: instruction, output\).*data.text_field"):
        read([path])


def test_expand_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    (tmp_path / "a" / ".hidden").write_text("h")
    (tmp_path / "b.md").write_text("b")
    assert expand_sources([str(tmp_path / "*.md"), str(tmp_path), str(tmp_path / "b.md")]) == [
        tmp_path / "b.md",
        tmp_path / "a" / "x.txt",
    ]
    with pytest.raises(DataError, match="matches no file"):
        expand_sources([str(tmp_path / "nope*.txt")])


def test_json_array_is_streamed_record_by_record(tmp_path):
    import tracemalloc

    records = [{"id": i, "text": f"record {i} " + "é漢😀 " * (i % 97), "score": i / 7} for i in range(30_000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")  # 16 MB, 1 MB chunks
    size = path.stat().st_size
    assert size > 15 * 2**20
    stats = SourceStats()
    tracemalloc.start()
    count = 0
    for i, doc in enumerate(read_documents([path], text_field="text", chunk_chars=0, stats=stats)):
        assert doc.text == records[i]["text"] and doc.origin == f"{path}[{i}]"
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == len(records)
    # whole, the file's text alone would take > 60 MiB as a Python str (4 bytes per character with emoji)
    assert peak < 12 * 2**20, (
        f"peak {peak / 2**20:.1f} MiB of Python memory for a {size / 2**20:.1f} MiB file"
    )


def test_json_edge_cases_and_malformed_arrays_name_the_line(tmp_path):
    (tmp_path / "empty.json").write_text("  [ ]\n", encoding="utf-8")
    (tmp_path / "one.json").write_text('{"text": "only"}', encoding="utf-8")
    assert read([tmp_path / "empty.json"])[0] == []
    assert [d.text for d in read([tmp_path / "one.json"])[0]] == ["only"]
    (tmp_path / "bad.json").write_text('[\n{"text": "a"},\n{"text": "b"}\n{"text": "c"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:4: malformed JSON \(expected , or \]"):
        read([tmp_path / "bad.json"])
    (tmp_path / "cut.json").write_text('[\n{"text": "a"},\n{"text": "b', encoding="utf-8")
    with pytest.raises(DataError, match=r"cut\.json:3: malformed JSON"):
        read([tmp_path / "cut.json"])


def test_a_stray_nul_byte_loses_only_its_record_and_a_really_binary_file_is_still_skipped(tmp_path):
    """Crawl shards hold stray control bytes: a JSONL file with one raw NUL used to be skipped whole as binary."""
    import random

    rng = random.Random(0)
    good = [
        f"record {i}: " + " ".join(rng.choice(["crawl", "shard", "text", "ok"]) for _ in range(20))
        for i in range(40)
    ]
    lines = [json.dumps({"text": t}).encode() for t in good]
    bad_line = 7  # 1-based line of the bad record, in the first sniffed block
    lines.insert(bad_line - 1, b'{"text": "broken \x00 record"}')
    lines.append(b'{"text": "form feed \x0c and bell \x07 in a string"}')  # another bad record, last line
    jsonl = tmp_path / "crawl.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    text = tmp_path / "page.txt"
    text.write_bytes(b"a text file with a stray \x00 byte\nand more text after it\n")
    image = tmp_path / "image.dat"  # no telling suffix: binary by its bytes
    image.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    zeros = tmp_path / "zeros.jsonl"
    zeros.write_bytes(b'{"text": "x"}\n' + b"\x00" * 2000)
    docs, stats = read([jsonl, text, image, zeros])
    assert [d.text for d in docs[:-1]] == good  # every good record, before and after the bad one
    assert (
        docs[-1].text == "a text file with a stray \x00 byte\nand more text after it\n"
    )  # clean removes \x00
    assert stats.malformed_records == 2
    assert stats.malformed_examples[0].startswith(
        f"{jsonl}:{bad_line}: malformed JSON (a raw control byte 0x00"
    )
    assert stats.malformed_examples[1].startswith(
        f"{jsonl}:{len(good) + 2}: malformed JSON (a raw control byte"
    )
    assert stats.binary_skipped == [str(image), str(zeros)]
    assert stats.as_dict()["binary_skipped"] == 2
    from lmforge.config import DataConfig
    from lmforge.data.prepare import prepare_data

    prepare_data(
        DataConfig(tokenizer="char", val_fraction=0.0), [str(jsonl)], tmp_path / "out", progress=False
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["sources"]
    assert report["malformed_records"] == 2 and report["binary_skipped"] == 0
    assert report["malformed_examples"][0].startswith(f"{jsonl}:{bad_line}: ")
