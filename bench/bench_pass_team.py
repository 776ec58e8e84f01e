"""bench/pass_team_compare.py (the step's passes on the shared pool against
the serial passes) in its smoke mode: one shape, one model, one workload,
one round.  Not a benchmark: it keeps the script working under the CI's
``pytest bench --benchmark-disable``.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/pass_team_compare.py   # the measurement
"""
import fastgrad as fg
import pass_team_compare


def test_pass_team_compare_smoke(capsys):
    assert pass_team_compare.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert ("team / serial update" in out and "parfor / serial" in out) or \
        "cannot be shared" in out or "one thread" in out
    assert not fg.blas_pool_status()[0]     # the pool is given back
