"""`lite-rlhf export`'s output directory: an earlier export is replaced only while it holds nothing but the files
that export wrote, as it wrote them (its marker lists them); anything else is named, and nothing is changed."""

import json

import pytest

from lite_rlhf.export import MARKER, check_out
from lite_rlhf.models import ModelNotFound


def earlier_export(out, listed=True):
    """What export leaves: its files, and the marker listing them with their stamps (or, from before the list,
    without one)."""
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "README.md").write_text("the card\n")
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(out.iterdir())}
    (out / MARKER).write_text(json.dumps({"adapter": "a", "base": "b", **({"files": files} if listed else {})}))
    return out


def test_an_untouched_earlier_export_may_be_replaced(tmp_path):
    out = earlier_export(tmp_path / "merged")
    check_out(out)
    check_out(out, {"model.safetensors", "README.md", "config.json"})
    check_out(tmp_path / "new")  # absent
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")


def test_a_file_added_since_is_named_and_kept(tmp_path):
    out = earlier_export(tmp_path / "merged")
    (out / "notes").mkdir()
    (out / "notes" / "NOTES.md").write_bytes(b"mine\n")
    with pytest.raises(ModelNotFound, match=r"holds 'notes/NOTES.md', which lite-rlhf export did not write; nothing"):
        check_out(out)
    with pytest.raises(ModelNotFound, match="notes/NOTES.md"):  # also once the new export's files are known
        check_out(out, {"model.safetensors", "README.md", "notes/NOTES.md"})
    assert (out / "notes" / "NOTES.md").read_bytes() == b"mine\n"


def test_an_export_file_edited_since_is_the_users(tmp_path):
    out = earlier_export(tmp_path / "merged")
    (out / "README.md").write_text("the card, with my notes added\n")
    with pytest.raises(ModelNotFound, match=r"holds 'README.md' \(changed since the export wrote it\), which"):
        check_out(out)


def test_an_export_from_before_the_list_is_checked_against_this_ones_files(tmp_path):
    out = earlier_export(tmp_path / "merged", listed=False)
    (out / "NOTES.md").write_text("mine")
    check_out(out)  # before the model loads, nothing tells the export's files from the user's
    with pytest.raises(ModelNotFound, match="holds 'NOTES.md', which"):
        check_out(out, {"model.safetensors", "README.md"})
    check_out(out, {"model.safetensors", "README.md", "NOTES.md"})  # a name this export writes is its own
