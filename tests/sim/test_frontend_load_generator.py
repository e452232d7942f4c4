"""The C load generator on the simulated blkfront's ring, against a toy backend."""

import numpy as np
import pytest
from frontend_fakes import ring_pair

from blkpy import ring as blkif
from blkpy.sim.blkfront_ring import ProtocolError
from blkpy.sim.guest import create_sim_dir, remove_sim_dir
from blkpy.sim.load_generator import run_reads


@pytest.fixture
def pair(request):
    sim_dir = create_sim_dir()
    guest, fr, be = ring_pair(sim_dir, **{"persistent": True, **getattr(request, "param", {})})
    yield fr, be
    be.stop()
    guest.close()
    remove_sim_dir(sim_dir)


@pytest.mark.parametrize(
    "pair", [{}, {"abi": "x86_32-abi", "order": 1}], indirect=True
)
@pytest.mark.parametrize(("nbytes", "depth", "random"), [(4096, 8, True), (64 * 4096, 4, False)])
def test_reads_complete_and_the_ring_is_handed_back(pair, nbytes, depth, random):
    fr, be = pair
    be.disk[:] = np.random.default_rng(0).bytes(len(be.disk))
    result = run_reads(fr, nbytes=nbytes, depth=depth, seconds=0.2, random=random, span=1 << 20)
    assert result.completed > 0 and result.errors == 0
    assert result.bytes == result.completed * nbytes
    reqs = np.concatenate([b.view(fr.abi.raw) for b in be.seen]).view(fr.abi.request)
    assert len(reqs) == result.completed
    assert reqs["id"].max() < depth
    sectors = reqs["sector_number"]
    assert np.all(sectors % (nbytes // 512) == 0) and np.all(sectors * 512 + nbytes <= 1 << 20)
    if not random:
        assert sectors[1] - sectors[0] == nbytes // 512
    indirect = nbytes > 11 * 4096
    assert np.all(reqs["operation"] == (blkif.BLKIF_OP_INDIRECT if indirect else 0))
    # the Python frontend carries on where the C loop stopped
    done = fr.submit(blkif.BLKIF_OP_READ, 8, nbytes=4096)
    fr.push()
    (c,) = fr.wait_all(5)
    assert c.id == done and c.data.tobytes() == bytes(be.disk[4096:8192])


def test_a_bad_response_stops_the_generator(pair):
    fr, be = pair
    be.wrong_operation = True
    with pytest.raises(ProtocolError, match="bad response"):
        run_reads(fr, nbytes=4096, depth=4, seconds=0.2, random=True)


def test_error_statuses_are_counted(pair):
    fr, be = pair
    be.fail_all = True
    result = run_reads(fr, nbytes=4096, depth=2, seconds=0.1, random=True)
    assert result.completed > 0 and result.errors == result.completed


def test_request_size_must_be_whole_pages(pair):
    fr, _be = pair
    with pytest.raises(ValueError):
        run_reads(fr, nbytes=1000, depth=2, seconds=0.1, random=True)


@pytest.mark.parametrize("pair", [{"persistent": False}], indirect=True)
@pytest.mark.parametrize("nbytes", [4096, 16 * 4096])
def test_transient_grants_are_granted_and_revoked_per_request(pair, nbytes):
    fr, _be = pair
    result = run_reads(fr, nbytes=nbytes, depth=4, seconds=0.2, random=True)
    pages = nbytes // 4096 + (1 if nbytes > 11 * 4096 else 0)  # + the indirect page
    assert result.completed > 0 and result.errors == 0
    assert result.grants_ended == result.completed * pages
    issued, ended = fr.stats.grants_issued, fr.stats.grants_ended
    assert issued == ended == 4 * pages  # the templates' grants, revoked when handed back
    fr.submit(blkif.BLKIF_OP_READ, 0, nbytes=4096)
    fr.push()
    (c,) = fr.wait_all(5)
    assert c.status == 0 and fr.stats.grants_issued == fr.stats.grants_ended


@pytest.mark.parametrize("pair", [{"persistent": False}], indirect=True)
def test_transient_grant_left_mapped_is_a_protocol_error(pair):
    fr, be = pair
    be.keep_mapped = True
    with pytest.raises(ProtocolError, match="has not unmapped grant"):
        run_reads(fr, nbytes=4096, depth=2, seconds=0.2, random=True)


@pytest.mark.parametrize("count", [1, 5, 1000])
def test_count_bounds_the_run_exactly(pair, count):
    """``count`` makes the amount of work reproducible (the soak campaign's bursts): that
    many requests, depth or not, and nothing left in flight."""
    fr, be = pair
    result = run_reads(fr, nbytes=4096, depth=8, seconds=60, random=True, span=1 << 20,
                       count=count)
    assert result.completed == count and result.errors == 0
    assert sum(len(b) for b in be.seen) == count
    assert fr.in_flight == 0 and not fr.failed
