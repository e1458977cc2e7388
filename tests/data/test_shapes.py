"""The shapes world: captions parse back to their scene, and renders are deterministic and readable."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cycletune.data.shapes import (
    CAPTIONER_ONLY_COMBINATIONS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    UNSEEN_COMBINATIONS,
    WORDS,
    Scene,
    SceneAttributes,
    all_scenes,
    describe,
    is_unseen,
    parse,
    random_scene,
    render,
    scenes_of,
)


def test_all_scenes_enumerates_the_world_once() -> None:
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == len(SHAPES) * len(COLOURS) * len(SIZES) * len(POSITIONS) == 180


def test_every_template_parses_back_to_its_scene() -> None:
    assert len(TEMPLATES) >= 3
    for scene in all_scenes():
        captions = {describe(scene, template) for template in range(len(TEMPLATES))}
        assert len(captions) == len(TEMPLATES)  # the templates really are different sentences
        for caption in captions:
            assert parse(caption).scene == scene, caption


def test_random_captions_use_synonyms_and_parse_back() -> None:
    rng = np.random.default_rng(0)
    captions = []
    for _ in range(600):
        scene = random_scene(rng)
        caption = describe(scene, rng)
        assert parse(caption).scene == scene, caption
        captions.append(caption)
    words = {word for caption in captions for word in caption.split()}
    assert {"big", "large", "middle", "center"} <= words
    assert "an orange" in " ".join(captions) and "a orange" not in " ".join(captions)


def test_words_covers_everything_the_grammar_emits() -> None:
    rng = np.random.default_rng(1)
    emitted = {
        word
        for scene in all_scenes()
        for caption in [describe(scene, rng), *(describe(scene, t) for t in range(len(TEMPLATES)))]
        for word in re.findall(r"[a-z]+", caption)
    }
    assert emitted <= set(WORDS)
    assert {"circle", "purple", "big", "middle", "top", "left", "an"} <= set(WORDS)
    assert list(WORDS) == sorted(set(WORDS))


def test_parse_is_tolerant_to_case_punctuation_and_prefixes() -> None:
    assert parse("A PICTURE OF A Big, Red Circle... in the MIDDLE!").scene == Scene(
        "circle", "red", "large", "center"
    )
    assert parse("two blue triangles, small; upper-right corner").scene == Scene(
        "triangle", "blue", "small", "top right"
    )


def test_parse_returns_none_for_missing_or_conflicting_attributes() -> None:
    assert parse("a red shape at the top") == SceneAttributes(colour="red")
    assert parse("a red or blue square, big, in the top left or the center") == SceneAttributes(
        shape="square", size="large"
    )
    assert parse("").scene is None


def test_random_scene_and_render_are_deterministic() -> None:
    assert random_scene(np.random.default_rng(5)) == random_scene(np.random.default_rng(5))
    scene = Scene("square", "yellow", "small", "bottom left")
    assert render(scene, 32, seed=3).tobytes() == render(scene, 32, seed=3).tobytes()
    assert render(scene, 32, seed=3).tobytes() != render(scene, 32, seed=4).tobytes()


@pytest.mark.parametrize("resolution", [32, 64])
def test_distinct_scenes_give_distinct_images(resolution: int) -> None:
    images = [render(scene, resolution, seed=0) for scene in all_scenes()]
    assert all(image.size == (resolution, resolution) and image.mode == "RGB" for image in images)
    assert len({image.tobytes() for image in images}) == len(images)


def read_scene(pixels: np.ndarray) -> tuple[str, str, int]:
    """A tiny oracle: (position, colour) of the shape, and its area in pixels."""
    background = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    distance = np.abs(pixels - background).sum(axis=2)
    ys, xs = np.nonzero(distance > 60)
    centre_x, centre_y = xs.mean() / pixels.shape[1], ys.mean() / pixels.shape[0]
    if abs(centre_x - 0.5) < 0.1 and abs(centre_y - 0.5) < 0.1:
        position = "center"
    else:
        position = f"{'top' if centre_y < 0.5 else 'bottom'} {'left' if centre_x < 0.5 else 'right'}"
    core = pixels[distance > 0.8 * distance.max()].mean(axis=0)
    colour = min(COLOUR_RGB, key=lambda name: np.abs(core - np.array(COLOUR_RGB[name])).sum())
    return position, colour, len(xs)


def test_renders_are_readable_at_32_pixels() -> None:
    areas: dict[Scene, int] = {}
    for index, scene in enumerate(all_scenes()):
        position, colour, areas[scene] = read_scene(
            np.asarray(render(scene, 32, seed=index), dtype=np.float64)
        )
        assert (position, colour) == (scene.position, scene.colour), scene
    for scene, area in areas.items():
        if scene.size == "small":
            assert area < areas[Scene(scene.shape, scene.colour, "large", scene.position)]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="colour"):
        Scene("circle", "pink", "small", "center")
    with pytest.raises(ValueError, match="template index"):
        describe(Scene("circle", "red", "small", "center"), len(TEMPLATES))
    with pytest.raises(ValueError, match="resolution"):
        render(Scene("circle", "red", "small", "center"), 4)


def test_the_demo_split_holds_out_a_latin_pattern_of_colour_shape_pairs() -> None:
    seen, unseen = scenes_of("seen"), scenes_of("unseen")
    assert len(unseen) == len(UNSEEN_COMBINATIONS) * len(SIZES) * len(POSITIONS) == 60
    assert sorted(seen + unseen, key=all_scenes().index) == all_scenes()
    assert all(is_unseen(scene) for scene in unseen) and not any(is_unseen(scene) for scene in seen)
    # Every colour and every shape still appears in the paired (seen) part, so unseen pairs are new
    # combinations of known values rather than unknown values.
    assert {scene.colour for scene in seen} == set(COLOURS)
    assert {scene.shape for scene in seen} == set(SHAPES)
    assert all(sum(shape == s for _, s in UNSEEN_COMBINATIONS) == 2 for shape in SHAPES)


def test_the_designed_split_keeps_a_colour_from_the_generator_only() -> None:
    seen = scenes_of("seen")
    generator_seen, captioner_only = scenes_of("generator_seen"), scenes_of("captioner_only")
    assert sorted(generator_seen + captioner_only, key=seen.index) == seen
    assert {(scene.colour, scene.shape) for scene in captioner_only} == CAPTIONER_ONLY_COMBINATIONS
    # The generator's paired data holds no scene of that colour at all; the captioner's holds two shapes of it.
    withheld = {colour for colour, _ in CAPTIONER_ONLY_COMBINATIONS}
    assert len(withheld) == 1 and not any(scene.colour in withheld for scene in generator_seen)
    assert {scene.shape for scene in generator_seen} == set(SHAPES)


@pytest.mark.parametrize("combinations", ["seen", "unseen", "generator_seen", "captioner_only"])
def test_random_scene_draws_only_from_the_asked_part(combinations: str) -> None:
    rng = np.random.default_rng(0)
    drawn = [random_scene(rng, combinations) for _ in range(300)]
    assert set(drawn) <= set(scenes_of(combinations))
    # Spread over the part (all of a small one), not stuck on a few scenes.
    assert len(set(drawn)) > min(40, len(scenes_of(combinations)) - 1)
    with pytest.raises(ValueError, match="combinations must be one of"):
        scenes_of("some")
