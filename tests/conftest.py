"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gridvm.images.store import ImageInfo
from gridvm.images.tiny import build_tiny

TEST_IMAGES = Path(os.environ.get("GRIDVM_TEST_IMAGES", "/var/cache/gridvm/test-images"))


@pytest.fixture(scope="session")
def tiny_image() -> ImageInfo:
    """The tiny guest image, built once and cached in $GRIDVM_TEST_IMAGES."""
    return build_tiny(TEST_IMAGES)


@pytest.fixture(scope="session")
def test_images_dir(tiny_image: ImageInfo) -> Path:
    """The image store the test daemons use (holds the tiny image)."""
    return TEST_IMAGES


from hostlab import host  # noqa: E402,F401  (module fixture: a gridvmd in its own netns)
from provisionlab import debian_image  # noqa: E402,F401  (session: the Debian test image)
