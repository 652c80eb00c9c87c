"""The job's host side runs on threads of its own (sequences read and tokenised ahead of the model, rows
written behind it); what goes wrong there ends the job as it would without them: one line, its exit code,
every row marked done correct."""

from extract.data import input_index


def test_an_input_index_damaged_mid_run_stops_the_job_with_one_line(tmp_path, long_job):
    out = tmp_path / "out.h5"
    index = input_index.directory_for(out)
    sequences = index / input_index.SEQUENCES

    def damage_the_index(_job):
        sequences.write_bytes(b"")  # the batches not yet read can no longer be
        return lambda: None  # the rerun sees the index is incomplete and builds it anew

    long_job.fail_mid_run_then_resume(out, damage_the_index, f"{sequences}: ends before the sequences it should "
                                      f"hold; the input index is damaged; rerun the same command to resume (it "
                                      f"reads the inputs again)")
