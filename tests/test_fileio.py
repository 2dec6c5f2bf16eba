"""fileio.read_log_rows: the one reader of a finished or growing log.csv (the LR finder's curves, the LR tab)."""

import pytest

from embedtrain.fileio import iter_log_rows, read_log_rows

HEADER = "update,batch,epoch,images_seen,loss,val_loss,val_train_loss,lr,effective_lr,time_s\n"


def test_rows_are_text_with_empty_values_kept_and_a_cut_row_marked(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(HEADER + "1,2,0.5,4,0.25,,,0.001,0.001,0.1\n2,4,1.0,8,0.2,0.3,,0.001,0.001,0.2\n3,6,1.5")
    rows = read_log_rows(path)
    assert [r["update"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["val_loss"] == "" and rows[1]["val_loss"] == "0.3"
    assert rows[2]["loss"] is None                     # the last row a kill cut short
    assert list(iter_log_rows(path)) == rows


def test_a_missing_log_raises_unless_a_live_view_asks(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_log_rows(tmp_path / "log.csv")
    assert read_log_rows(tmp_path / "log.csv", missing_ok=True) == []
    (tmp_path / "log.csv").write_bytes(b"")
    assert read_log_rows(tmp_path / "log.csv") == []   # created, nothing written yet


def test_bytes_that_are_not_utf8_do_not_stop_the_reader(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(HEADER.encode() + b"1,2,0.5,4,0.25,,,0.001,0.001,0.1\xe9\n")
    assert read_log_rows(path)[0]["time_s"] == "0.1\ufffd"
