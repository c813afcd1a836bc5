"""One model over several devices (issue 24): plans, loading straight to each device, activations moved at the
boundaries, per-device KV caches, block offload. CPU has one device, so splits here use ``cpu`` + ``meta`` (a
boundary that a tensor which was not moved cannot cross) and an all-``cpu`` map with every boundary hook active;
benchmarks/gpu_placement.py runs the real splits on GPUs."""

import pytest
import torch

from tl_vlm import HookedVLM
from tl_vlm.placement import parse_size, placement_units, plan_placement
from tl_vlm.zoo.data import sample_images

TOY = "tl-vlm/toy-llava"
PROMPT = "USER: <image>\nWhat is the colour? ASSISTANT:"
CPU, META = torch.device("cpu"), torch.device("meta")


@pytest.fixture(scope="module")
def base():
    return HookedVLM.from_pretrained(TOY)


@pytest.fixture(scope="module")
def inputs(base):
    return base.prepare(images=sample_images(2, seed=4), text=[PROMPT, PROMPT.replace("colour", "shape")])


def test_units_cover_every_weight_once(base):
    units = placement_units(base)
    assert list(units)[:4] == ["embed", "rotary", "blocks.0", "blocks.1"] or "vision" in units
    assert sum(units.values()) == sum(p.numel() * p.element_size() for p in [*base.parameters(), *base.buffers()])
    assert placement_units(base, torch.float16)["blocks.0"] * 2 == units["blocks.0"]


def test_budget_plan_keeps_the_image_path_first_and_the_unembedding_last(base):
    units = placement_units(base)
    first = sum(v for k, v in units.items() if not k.startswith("blocks.") and k not in ("ln_final", "unembed"))
    budget = first + units["blocks.0"]  # the first device takes the image path, embeddings and one block
    plan = plan_placement(base, max_memory={"cpu": budget, "meta": 10 * sum(units.values())})
    assert {plan[u] for u in ("vision", "projector", "embed", "rotary", "blocks.0")} == {CPU}
    assert plan["blocks.1"] == plan["ln_final"] == plan["unembed"] == META


def test_tied_unembedding_stays_with_its_embedding():
    tied = HookedVLM.from_pretrained("tl-vlm/toy-llava", load_processor=False)
    tied.cfg.tie_word_embeddings = True  # the planning rule only reads the flag
    units = placement_units(tied)
    first = sum(v for k, v in units.items() if not k.startswith("blocks.") and k != "ln_final")
    plan = plan_placement(tied, max_memory={"cpu": first, "meta": 10 * sum(units.values())})
    assert plan["unembed"] == plan["embed"] == CPU and plan["ln_final"] == META


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device_map": {"blocks": "cpu"}}, "unplaced: embed"),
        ({"device_map": {"": "cpu", "blocks.7": "cpu"}}, "'blocks.7' names no part"),
        ({"device_map": {"": "cuda:3"}}, "names cuda:3 but this machine has"),
        ({"max_memory": {"cpu": "1KiB"}}, "does not fit: .*raise max_memory"),
        ({"max_memory": {"cpu": "lots"}}, "expected bytes or a size"),
        ({"device_map": "balanced"}, "expected 'auto'"),
    ],
)
def test_bad_placements_are_refused_naming_what_does_not_fit(base, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(base, **kwargs)


def test_placement_and_device_together_are_refused():
    with pytest.raises(ValueError, match="either device="):
        HookedVLM.from_pretrained(TOY, device="cpu", device_map="auto")


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size(123) == 123


def test_weights_load_straight_to_their_device_and_activations_cross_each_boundary(inputs):
    split = {"": "cpu", "blocks.1": "meta", "ln_final": "meta", "unembed": "meta"}
    model = HookedVLM.from_pretrained(TOY, device_map=split)
    assert model.blocks[1].attn.W_Q.device == META and model.unembed.W_U.device == META
    assert model.blocks[0].attn.W_Q.device == CPU and model.vision.blocks[0].attn.W_Q.device == CPU
    seen = {}
    record = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post")
    hooks = [(name, lambda t, hook: seen.__setitem__(hook.name, t.device)) for name in record]
    # the logits are meta tensors: moving them back to the input's device is the one step that cannot run
    with pytest.raises(NotImplementedError, match="meta"):
        model.run_with_hooks(inputs, fwd_hooks=hooks)
    assert seen == {"blocks.0.hook_resid_post": CPU, "blocks.1.hook_resid_pre": META, "blocks.1.hook_resid_post": META}


def test_a_placed_model_computes_what_the_unsplit_one_does(base, inputs):
    units = placement_units(base)
    model = HookedVLM.from_pretrained(TOY, device_map={u: "cpu" for u in units})  # every boundary hook active
    assert set(model.device_map) == set(units)
    with torch.no_grad():
        expected, cache = base.run_with_cache(inputs)
        logits, placed_cache = model.run_with_cache(inputs)
        assert torch.equal(logits, expected)
        assert set(cache.keys()) == set(placed_cache.keys())
        ablated = [("blocks.1.attn.hook_z", lambda z, hook: z.index_fill(2, torch.tensor([0]), 0.0))]
        assert torch.equal(model.run_with_hooks(inputs, fwd_hooks=ablated), base.run_with_hooks(inputs, fwd_hooks=ablated))
    settings = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(inputs, **settings), base.generate(inputs, **settings))
    assert torch.equal(model.generate(inputs, num_beams=2, **settings), base.generate(inputs, num_beams=2, **settings))


def test_offloaded_blocks_compute_what_the_unsplit_model_does(base, inputs):
    model = HookedVLM.from_pretrained(TOY, device="cpu", offload_blocks=True)
    assert model.device_map["blocks.0"] == CPU and model.offload is not None
    with torch.no_grad():
        assert torch.equal(model(inputs), base(inputs))
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
        _, expected = base.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
        assert all(torch.equal(cache[k], expected[k]) for k in expected.keys())
    assert torch.equal(model.generate(inputs, max_new_tokens=4, do_sample=False),
                       base.generate(inputs, max_new_tokens=4, do_sample=False))
    with pytest.raises(ValueError, match="streams the blocks to one device"):
        HookedVLM.from_pretrained(TOY, offload_blocks=True)
