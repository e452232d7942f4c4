import pytest

from blkpy.vdev import vdev_to_devid

# The worked examples of the vbd interface document (xenbus-vbd spec §7).
EXAMPLES = {
    "xvda": 51712, "xvda1": 51713, "xvdb": 51728, "xvdp": 51952, "xvdq": 268439552,
    "xvdaa": 268442112, "xvda16": 268435472, "hda": 768, "hdb": 832, "hdc": 5632,
    "hdd": 5696, "sda": 2048, "sdb": 2064, "sda1": 2049, "d0p1": 51713, "51712": 51712,
    "0xca00": 51712,
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_known_names(name):
    assert vdev_to_devid(name) == EXAMPLES[name]


@pytest.mark.parametrize("name", ["", "xvd", "xvda01", "hde", "sdq", "hda64", "vda", "xvdA",
                                  str(2 << 28)])
def test_bad_names(name):
    with pytest.raises(ValueError):
        vdev_to_devid(name)
