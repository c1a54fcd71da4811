"""PromptSet: validation, slicing, hashing."""

import numpy as np
import pytest

from mars_core import InputError
from mars_core.prompts import PromptSet


def _img(v):
    return np.full((4, 4, 3), v, dtype=np.uint8)


def test_modality_batches_subset():
    ps = PromptSet("harmful_image", ["a", "b", "c"], images=[_img(0), _img(1), _img(2)], harmful=True,
                   meta={"concepts": ["x", "y", "z"], "source": "unit"})
    assert ps.modality == "image" and len(ps) == 3
    chunks = list(ps.batches(2))
    assert [c[0] for c in chunks] == [["a", "b"], ["c"]]
    assert int(chunks[1][1]["images"][0][0, 0, 0]) == 2
    sub = ps.subset([2, 0])
    assert sub.texts == ["c", "a"] and int(sub.images[0][0, 0, 0]) == 2 and sub.harmful is True
    assert sub.meta == {"concepts": ["z", "x"], "source": "unit"}  # per-prompt meta follows the rows
    assert PromptSet("t", ["x"]).modality == "text"
    assert PromptSet("v", ["x"], videos=[np.zeros((2, 4, 4, 3), np.uint8)]).modality == "video"


def test_hash_sees_text_and_pixels():
    a = PromptSet("s", ["a", "b"], images=[_img(0), _img(1)])
    assert a.sha256 == PromptSet("s", ["a", "b"], images=[_img(0), _img(1)]).sha256
    assert a.sha256 != PromptSet("s", ["a", "b"], images=[_img(0), _img(2)]).sha256
    assert a.sha256 != PromptSet("s", ["b", "a"], images=[_img(0), _img(1)]).sha256
    assert a.provenance() == {"s_sha256": a.sha256, "s_n": 2}


def test_bad_sets():
    with pytest.raises(InputError, match="empty"):
        PromptSet("e", [])
    with pytest.raises(InputError, match="one per text"):
        PromptSet("m", ["a", "b"], images=[_img(0)])
    with pytest.raises(InputError, match="not both"):
        PromptSet("m", ["a"], images=[_img(0)], videos=[np.zeros((1, 4, 4, 3))])
    with pytest.raises(InputError, match="batch_size"):
        list(PromptSet("a", ["a"]).batches(0))
