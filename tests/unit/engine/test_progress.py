"""Progress reports: what they say, when they are printed, and the bar (drawn by a whole job on a terminal in
tests/jobs/test_progress_on_a_terminal.py)."""

import io
import logging

import numpy as np
import pytest

from extract.output import hdf5_file
from extract.engine import progress
from extract.output.hdf5_file import RowDataset, RowWriter


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log():
    logger = logging.getLogger("test_progress")
    handler = _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, handler.lines
    logger.removeHandler(handler)


def test_a_report_line_says_rows_residues_rate_and_eta():
    snapshot = progress.Snapshot(rows=1200, total_rows=5000, residues=340_000, total_residues=1_200_000,
                                 residues_per_second=2300.0)
    assert progress.status_line(snapshot) == "1200/5000 rows, 340.0k/1.2M residues (28%), 2.3k residues/s, ETA 6m14s"
    assert progress.bar(snapshot).startswith("[########" + "." * 22 + "] 1200/5000 rows")
    stalled = progress.Snapshot(rows=0, total_rows=10, residues=0, total_residues=100, residues_per_second=0.0)
    assert progress.status_line(stalled).endswith("0 residues/s, ETA ?")
    assert [progress.short_duration(s) for s in (59, 3600 * 5 + 61, 86400 * 2 + 3600)] == ["59s", "5h01m", "2d01h"]


def test_rows_written_show_up_and_no_line_comes_before_the_interval(tmp_path, log):
    logger, lines = log
    out = tmp_path / "out.h5"
    lengths = np.arange(1, 11) * 10
    datasets = [RowDataset("mean/layer_1", 4)]
    layout = hdf5_file.FileLayout(ids=[f"p{i}" for i in range(10)], lengths=lengths, covered=lengths, datasets=datasets,
                                  storage_dtype="float32")
    hdf5_file.create(out, layout, {"tool": hdf5_file.TOOL})
    writer = RowWriter(out, datasets)
    watcher = progress.ProgressWatcher(out, lengths, 3600, logger, io.StringIO())
    for row in range(6):  # six batches, far within the interval: no line
        writer.write(np.array([row]), {"mean/layer_1": np.ones((1, 4), dtype=np.float32)})
    snapshot = watcher.snapshot()
    watcher.stop()
    writer.close()
    assert (snapshot.rows, snapshot.total_rows, snapshot.residues, snapshot.total_residues) == (6, 10, 210, 550)
    assert lines == []
