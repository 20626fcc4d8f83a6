import numpy as np
import pytest

from moma_plugin.data.image_tokenizer import (
    PatchKMeansTokenizer,
    load_image_tokenizer,
    reconstruction_error,
)
from moma_plugin.data.text_tokenizer import BPETokenizer, ByteTokenizer, load_text_tokenizer

TEXTS = [
    "Here is a handwritten seven.", "A row of handwritten digits: three, one, four.",
    "Ünïcödé  with   spaces\nand newlines\ttabs — and emoji 🙂 and 中文.", "", " leading space",
]
CORPUS = [f"A crop from a photo of a flower, number {i}, taken from the top left." for i in range(200)]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS + TEXTS, vocab_size=400)


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips_exactly(bpe, text):
    for tokenizer in (ByteTokenizer(), bpe):
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text


def test_bpe_compresses_and_reloads(bpe, tmp_path):
    sentence = CORPUS[3]
    assert len(bpe.encode(sentence)) < len(sentence.encode()) / 2
    bpe.save(tmp_path / "bpe")
    ByteTokenizer().save(tmp_path / "bytes")
    reloaded = load_text_tokenizer(tmp_path / "bpe")
    assert reloaded.encode(TEXTS[2]) == bpe.encode(TEXTS[2])
    assert isinstance(load_text_tokenizer(tmp_path / "bytes"), ByteTokenizer)
    again = BPETokenizer.train(CORPUS + TEXTS, vocab_size=400)
    assert again.encode(TEXTS[1]) == bpe.encode(TEXTS[1])  # training is deterministic
    with pytest.raises(FileNotFoundError, match="not a saved"):
        load_text_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return (load_digits().images * (255 / 16)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def digit_tokenizer(digits):
    return PatchKMeansTokenizer.fit(digits[:600], image_size=16, patch_size=4, codebook_size=64, seed=0)


def test_image_codes_shape_range_and_determinism(digit_tokenizer, digits):
    codes = digit_tokenizer.encode(digits[700])
    assert codes.shape == (4, 4) and codes.min() >= 0 and codes.max() < 64
    assert digit_tokenizer.decode(codes).shape == (16, 16, 3)
    again = PatchKMeansTokenizer.fit(digits[:600], image_size=16, patch_size=4, codebook_size=64, seed=0)
    np.testing.assert_array_equal(again.codebook, digit_tokenizer.codebook)


def test_image_decode_error_small_against_mean_patch_baseline(digit_tokenizer, digits):
    held_out = digits[1000:1200]
    error = reconstruction_error(digit_tokenizer, held_out)
    # Baseline: a one-entry codebook holding the mean patch.
    mean_patch = np.concatenate([digit_tokenizer.patches(d) for d in digits[:600]]).mean(0)
    baseline = PatchKMeansTokenizer(mean_patch[None], 16, 4)
    baseline_error = reconstruction_error(baseline, held_out)
    assert error < 0.4 * baseline_error, (error, baseline_error)


def test_rgb_photo_round_trip_and_reload(tmp_path):
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[1]
    crops = [photo[i : i + 96, j : j + 96] for i in range(0, 300, 60) for j in range(0, 500, 60)]
    tokenizer = PatchKMeansTokenizer.fit(crops, image_size=32, patch_size=4, codebook_size=32, seed=1)
    assert reconstruction_error(tokenizer, crops[:5]) < 40
    tokenizer.save(tmp_path / "image")
    reloaded = load_image_tokenizer(tmp_path / "image")
    np.testing.assert_array_equal(reloaded.encode(crops[0]), tokenizer.encode(crops[0]))


def test_bad_images_are_clear_errors(digit_tokenizer):
    with pytest.raises(ValueError, match="uint8"):
        digit_tokenizer.encode(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        digit_tokenizer.encode(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="codes in"):
        digit_tokenizer.decode(np.full((4, 4), 64))
