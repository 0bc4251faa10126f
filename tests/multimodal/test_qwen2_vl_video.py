"""Qwen2-VL / Qwen2.5-VL video inputs: greedy tokens equal HF transformers' (float32) fed the
same ``pixel_values_videos`` / ``video_grid_thw`` (/ ``second_per_grid_ts``) the front end
makes; a video of two equal frames is its image's patches; M-RoPE positions equal HF's
``get_rope_index``; limits, placeholders and the encoder budget refuse bad input by name."""

from __future__ import annotations

import numpy as np
import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_qwen2_vl import IMAGE, IMAGE_PAD, VIDEO_PAD, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
ASK = "<|im_start|>user\n{}What happens?<|im_end|>\n<|im_start|>assistant\n"
TEXT = ASK.format("")


def frames(seed: int, n: int = 4, size=(40, 40)) -> np.ndarray:
    """``n`` random RGB frames ``[n, H, W, 3]`` uint8 (40 x 40: a 5 x 5 merged grid a step)."""
    return np.random.RandomState(seed).randint(0, 256, (n, *size, 3), dtype=np.uint8)


def pil_frames(seed: int, n: int, size=(32, 40)) -> list:
    from PIL import Image

    return [Image.fromarray(f) for f in frames(seed, n, size)]


def hf_video_greedy(path: str, kind: str, ids: list[int], features, max_new: int) -> list[int]:
    """HF generate on the front end's token ids and pixels (images and videos in prompt
    order, as HF takes them: each modality's in its own tensor)."""
    import torch
    import transformers

    from tests.multimodal.tiny_qwen2_vl import ARCHS

    model = getattr(transformers, ARCHS[kind]).from_pretrained(path, dtype=torch.float32).eval()
    t = torch.tensor([ids])
    inputs = {"input_ids": t, "attention_mask": torch.ones_like(t),
              "mm_token_type_ids": (t == IMAGE_PAD).int() + 2 * (t == VIDEO_PAD).int()}
    for modality, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        group = [f for f in features if f.modality == modality]
        if group:
            inputs[key] = torch.from_numpy(np.concatenate([f.pixels() for f in group]))
            inputs[f"{modality}_grid_thw"] = torch.tensor([f.grid_thw for f in group])
    videos = [f for f in features if f.modality == "video"]
    if kind == "qwen2_5_vl" and videos:
        tps = model.config.vision_config.tokens_per_second
        inputs["second_per_grid_ts"] = torch.tensor([f.time_interval / tps for f in videos])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
    return out[0, t.shape[1]:].tolist()


def _front_end(path: str):
    from tessellm.multimodal.processor import image_processor

    return image_processor(path, 2, 2)


def test_video_of_two_equal_frames_is_its_image(qwen2_vl_dir):
    """The video path's resize, normalization and temporal pairing: a still video (two equal
    frames) gives the image processor's patches of that frame, and the same grid."""
    still = np.repeat(np.asarray(image(3, (40, 52)))[None], 2, axis=0)
    front = _front_end(qwen2_vl_dir)
    _, (video,) = front.process(ASK.format(VIDEO), None, still)
    _, (img,) = front.process(ASK.format(IMAGE), [image(3, (40, 52))])
    assert (video.modality, img.modality) == ("video", "image")
    assert video.grid_thw == img.grid_thw == [1, 10, 12]
    np.testing.assert_array_equal(video.pixels(), img.pixels())
    assert video.identifier != img.identifier  # their positions may differ (Qwen2.5-VL)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_videos_match_hf(kind, qwen2_vl_dir, qwen2_5_vl_dir):
    """One batch: a 4-frame video (2 temporal steps of 5 x 5), a video of 3 PIL frames (padded
    to 4) after an image, the first video again at 4 fps (Qwen2.5-VL: other temporal
    positions), and text only."""
    path = qwen2_vl_dir if kind == "qwen2_vl" else qwen2_5_vl_dir
    video = frames(1)
    prompts = [ASK.format(VIDEO), ASK.format(f"{IMAGE} then {VIDEO}"), ASK.format(VIDEO), TEXT]
    data = [{"video": video}, {"image": [image(2, (24, 32))], "video": pil_frames(3, 3)},
            {"video": (video, {"fps": 4.0})}, None]
    with LLM(path, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 1, "video": 1}) as llm:
        out = llm.generate([{"prompt": p, "multi_modal_data": d} if d else p
                            for p, d in zip(prompts, data)], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids.count(VIDEO_PAD) for o in out] == [50, 40, 50, 0]
    front = _front_end(path)
    want = []
    for prompt, d in zip(prompts, data):
        ids, feats = front.process(prompt, (d or {}).get("image"), (d or {}).get("video"))
        want.append(hf_video_greedy(path, kind, ids, feats, MAX_NEW))
    assert [list(o.outputs[0].token_ids) for o in out] == want
    assert want[0] != want[3]  # the video decides the output
    if kind == "qwen2_5_vl":
        assert want[0] != want[2]  # ... and, on Qwen2.5-VL, its frame rate


def test_video_positions_equal_hf_rope_index(qwen2_5_vl_dir):
    """The M-RoPE table of an image then a video at 2 fps (temporal steps 2 apart: Qwen2.5-VL's
    ``tokens_per_second`` 2 x 1 s a step) is HF's ``get_rope_index``."""
    import torch
    import transformers

    from tessellm.multimodal.mrope import prompt_positions

    ids, feats = _front_end(qwen2_5_vl_dir).process(ASK.format(f"{IMAGE}{VIDEO}"),
                                                     [image(4, (24, 32))], frames(5, 6))
    assert [f.modality for f in feats] == ["image", "video"]
    assert feats[1].grid_thw == [3, 10, 10] and feats[1].time_interval == 2.0
    table, delta = prompt_positions(len(ids), feats, 2)
    t = torch.tensor([ids])
    hf = transformers.Qwen2_5_VLModel.from_pretrained(qwen2_5_vl_dir)
    with torch.no_grad():
        want, want_delta = hf.get_rope_index(
            t, (t == IMAGE_PAD).int() + 2 * (t == VIDEO_PAD).int(),
            torch.tensor([feats[0].grid_thw]), torch.tensor([feats[1].grid_thw]),
            second_per_grid_ts=torch.tensor([1.0]))
    want = want[:, 0].numpy()
    assert (table == want[:, :table.shape[1]]).all()
    assert sorted(set(table[0, feats[1].offset:feats[1].end] - table[0, feats[1].offset])) == [0, 2, 4]
    assert int(want_delta) == delta


def test_bad_video_inputs_are_refused_by_name(qwen2_vl_dir, llava_dir):
    from tessellm.multimodal.limits import model_mm_limits
    from tessellm.multimodal.processor import image_processor

    front = _front_end(qwen2_vl_dir)
    cases = [
        (lambda: front.process(ASK.format(VIDEO), None, [frames(1), frames(2), frames(3)]),
         "3 video(s), over the limit of 2"),
        (lambda: front.process(ASK.format(VIDEO + VIDEO), None, frames(1)),
         "2 video placeholder tokens (<|video_pad|>"),
        (lambda: front.process(ASK.format(""), None, frames(1)), "0 video placeholder tokens"),
        (lambda: front.check_without_images(front.tokenizer(ASK.format(VIDEO))["input_ids"]),
         "video placeholder tokens (<|video_pad|>, id 6) but no video"),
        (lambda: front.process(ASK.format(VIDEO), None, np.zeros((2, 8, 8))), "[T, H, W, 3]"),
        (lambda: front.process(ASK.format(VIDEO), None, np.full((2, 8, 8, 3), 300.0)),
         "values in 0..255"),
        (lambda: front.process(ASK.format(VIDEO), None, (frames(1), {"fps": 0})), "fps must be"),
        (lambda: image_processor(llava_dir, 1, 1).check_video_count(1), "takes no video inputs"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value), str(err.value)

    class Args:
        limit_mm_per_prompt = {"video": 1}

    from transformers import AutoConfig

    with pytest.raises(ValueError, match="takes no videos"):
        model_mm_limits(AutoConfig.from_pretrained(llava_dir), Args())
    assert model_mm_limits(AutoConfig.from_pretrained(qwen2_vl_dir), Args()) == {"image": 1, "video": 1}


def test_engine_refuses_videos_by_limit_and_budget_and_keeps_serving(qwen2_vl_dir):
    """A video over the limit (default 1), over the encoder budget (max_num_batched_tokens 64:
    a 6-step video is 150 tokens), or sent to a model limited to no videos is refused at
    add; the engine serves the next request. The same video twice in one batch is encoded
    once (the encoder cache shares equal content)."""
    video = {"prompt": ASK.format(VIDEO), "multi_modal_data": {"video": frames(1)}}
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             max_num_batched_tokens=64) as llm:
        with pytest.raises(ValueError, match="over the limit of 1 per prompt"):
            llm.generate({"prompt": ASK.format(VIDEO + VIDEO),
                          "multi_modal_data": {"video": [frames(1), frames(2)]}}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="A video of 150 placeholder tokens exceeds the encoder budget"):
            llm.generate({"prompt": ASK.format(VIDEO), "multi_modal_data": {"video": frames(1, 12)}},
                         GREEDY, use_tqdm=False)
        out = llm.generate([video, video], GREEDY, use_tqdm=False)
        assert llm.engine.core.runner.encoder_cache.num_encoded == 1
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=64, block_size=4,
             limit_mm_per_prompt={"image": 1, "video": 0}) as llm:
        with pytest.raises(ValueError, match="over the limit of 0"):
            llm.generate(video, GREEDY, use_tqdm=False)


def _mp4_data_url(video: np.ndarray, fps: int = 2) -> str:
    """The frames encoded (PyAV, mpeg4) as a data:video/mp4 URL."""
    import base64
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        for f in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_video_url_parts(qwen2_vl_dir, llava_dir):
    """/v1/chat/completions with a ``video_url`` part: HF's tokens on the decoded frames when
    a decoder (PyAV) is installed, else a 400 naming the packages to install; a video over
    the limit, and a video for a model without videos (LLaVA), are 400s naming the fix."""
    import asyncio

    from tessellm.config import EngineArgs
    from tessellm.multimodal.video import decoder_name
    from tests.multimodal.serve_app import chat_body

    has_decoder = decoder_name() == "av"
    url = _mp4_data_url(frames(7, 4, (48, 48))) if has_decoder else "data:video/mp4;base64,AAAA"
    part = {"type": "video_url", "video_url": {"url": url}}
    what = {"type": "text", "text": "What happens?"}

    async def requests(c):
        return [await c.post("/v1/chat/completions", json=chat_body(part, what, return_token_ids=True)),
                await c.post("/v1/chat/completions", json=chat_body(part, part, what))]

    args = EngineArgs(model=qwen2_vl_dir, dtype="float32", num_kv_blocks=64, block_size=4)
    one, two = asyncio.run(serve(args, requests))
    assert two.status_code == 400 and "over the limit of 1 per prompt" in two.json()["error"]["message"]
    if not has_decoder:
        assert one.status_code == 400, one.text
        assert "pip install av" in one.json()["error"]["message"]
    else:
        from tessellm.multimodal.media import data_url_bytes
        from tessellm.multimodal.video import decode_video

        assert one.status_code == 200, one.text
        video = decode_video(data_url_bytes(url, "video"), "test")
        ids, feats = _front_end(qwen2_vl_dir).process(ASK.format(VIDEO), None, video)
        assert one.json()["prompt_token_ids"] == ids
        assert one.json()["choices"][0]["token_ids"] == hf_video_greedy(qwen2_vl_dir, "qwen2_vl",
                                                                        ids, feats, MAX_NEW)

    async def llava(c):
        return await c.post("/v1/chat/completions", json=chat_body(part, what))

    r = asyncio.run(serve(EngineArgs(model=llava_dir, dtype="float32", num_kv_blocks=32), llava))
    assert r.status_code == 400 and "takes no video inputs" in r.json()["error"]["message"], r.text


def serve(args, requests):
    from tests.multimodal.serve_app import serve as run

    return run(args, requests)


@pytest.mark.parametrize("kind", ["qwen3_vl"])
def test_qwen3_vl_timestamped_videos_match_hf(kind, qwen3_vl_dir):
    """Qwen3-VL: each frame pair after its time (``<0.2 seconds>`` at 5 fps: frames 0 and 1),
    its own span, encoded and positioned as an image (DeepStack included); a 5-frame video
    (3 steps, the last pair padded) and one of 4 PIL frames after an image, as HF's generate
    on the same ids and ``pixel_values_videos``."""
    from tests.multimodal.tiny_qwen2_vl import VIDEO_PAD

    path = qwen3_vl_dir
    prompts = [ASK.format(VIDEO), ASK.format(f"{IMAGE} then {VIDEO}")]
    data = [{"video": (frames(8, 5), {"fps": 5.0})},
            {"image": [image(9, (24, 32))], "video": pil_frames(10, 4)}]
    with LLM(path, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 1, "video": 1}) as llm:
        out = llm.generate([{"prompt": p, "multi_modal_data": d} for p, d in zip(prompts, data)],
                           GREEDY, use_tqdm=False)
    front = _front_end(path)
    ids, feats = front.process(prompts[0], None, data[0]["video"])
    text = front.tokenizer.decode(ids)
    assert "<0.1 seconds><|vision_start|><|video_pad|>" in text and "<0.8 seconds>" in text
    assert ids.count(VIDEO_PAD) == 75 and [f.grid_thw for f in feats] == [[1, 10, 10]] * 3
    want = []
    for prompt, d in zip(prompts, data):
        ids, feats = front.process(prompt, d.get("image"), d["video"])
        want.append(_hf_qwen3_video(path, ids, feats))
    assert [list(o.outputs[0].token_ids) for o in out] == want


def _hf_qwen3_video(path: str, ids: list[int], features) -> list[int]:
    """HF generate with each video's steps as one ``pixel_values_videos`` entry of grid
    ``(t, h, w)`` (HF splits it per step itself)."""
    import torch
    import transformers

    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32).eval()
    t = torch.tensor([ids])
    inputs = {"input_ids": t, "attention_mask": torch.ones_like(t),
              "mm_token_type_ids": (t == IMAGE_PAD).int() + 2 * (t == VIDEO_PAD).int()}
    images = [f for f in features if f.modality == "image"]
    steps = [f for f in features if f.modality == "video"]
    if images:
        inputs["pixel_values"] = torch.from_numpy(np.concatenate([f.pixels() for f in images]))
        inputs["image_grid_thw"] = torch.tensor([f.grid_thw for f in images])
    inputs["pixel_values_videos"] = torch.from_numpy(np.concatenate([f.pixels() for f in steps]))
    inputs["video_grid_thw"] = torch.tensor([[len(steps), *steps[0].grid_thw[1:]]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=0)
    return out[0, t.shape[1]:].tolist()


def test_decoding_keeps_at_most_32_evenly_spread_frames_and_their_rate():
    """(PyAV only.) 40 frames at 8 fps decode to 32 frames at 6.4 fps (40/32 apart); bytes
    that are no video are refused by name."""
    pytest.importorskip("av")
    from tessellm.multimodal.media import data_url_bytes
    from tessellm.multimodal.video import decode_video

    video = decode_video(data_url_bytes(_mp4_data_url(frames(11, 40, (32, 32)), fps=8), "video"),
                         "clip")
    assert video.frames.shape == (32, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(6.4)
    with pytest.raises(ValueError, match="clip is not a video the decoder"):
        decode_video(b"not a video", "clip")


def test_decoding_holds_a_bounded_number_of_frames_of_a_long_clip():
    """A video_url's frames are thinned while decoding (``keep_spread``): of 5000 decoded
    frames at most 2 x 32 are alive at once, and those kept are evenly spaced from the first."""
    import weakref

    from tessellm.multimodal.video import MAX_DECODED_FRAMES, keep_spread

    alive, peak = weakref.WeakSet(), [0]

    class Frame:  # a decoded frame, as far as keep_spread sees one
        def __init__(self, index):
            self.index = index

    def tracked(n):
        for i in range(n):
            frame = Frame(i)
            alive.add(frame)
            peak[0] = max(peak[0], len(alive))
            yield frame

    kept, stride = keep_spread(tracked(5000), MAX_DECODED_FRAMES)
    assert peak[0] <= 2 * MAX_DECODED_FRAMES + 1, peak[0]
    indices = [f.index for f in kept]
    assert indices == list(range(0, 5000, stride)) and MAX_DECODED_FRAMES <= len(kept) < 2 * MAX_DECODED_FRAMES
    short, one = keep_spread(iter(range(40)), MAX_DECODED_FRAMES)
    assert short == list(range(40)) and one == 1


def test_frames_that_are_not_finite_are_refused():
    from tessellm.multimodal.video import as_video_list

    with pytest.raises(ValueError, match="values in 0..255.*not finite"):
        as_video_list(np.full((2, 8, 8, 3), np.nan))
