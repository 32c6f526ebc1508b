"""``compiler.verification``: the greedy comparison (a real prompt, where the texts part, whether it was a near-tie)
and the summary's wording."""

from __future__ import annotations

import numpy as np

from lowbit.compiler.verification import GENERATE_TOKENS, NEAR_TIE, PROMPT, compare_generation, generation_line, prompt_ids

VOCAB = 8


class _Input:
    name = "input_ids"


class FakeLM:
    """A session whose next token is ``(last + 1) % VOCAB``, except at ``flip`` generated tokens, where
    token ``(last + 2) % VOCAB`` wins (the artifact) or trails by ``margin`` (fp32's log-probability margin)."""

    def __init__(self, prompt_len: int, flip: int | None, margin: float, take_second: bool) -> None:
        self.prompt_len, self.flip, self.margin, self.take_second = prompt_len, flip, margin, take_second
        self.fed: list[list[int]] = []

    def get_inputs(self):
        return [_Input()]

    def run(self, _outputs, feeds):
        ids = feeds["input_ids"][0].tolist()
        self.fed.append(ids)
        logits = np.full((1, len(ids), VOCAB), -20.0, dtype=np.float32)
        last = ids[-1]
        first, second = (last + 1) % VOCAB, (last + 2) % VOCAB
        logits[0, -1, first] = 0.0
        if self.flip is not None and len(ids) - self.prompt_len == self.flip:
            logits[0, -1, second] = self.margin if self.take_second else -self.margin
        return [logits]


class FakeTokenizer:
    bos_id = 1

    def encode(self, text):
        return [3, 4] if text == PROMPT else [5]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_the_prompt_is_a_sentence_after_bos():
    assert PROMPT == "Once upon a time"
    assert prompt_ids(FakeTokenizer()) == [1, 3, 4]


def test_identical_texts():
    tok = FakeTokenizer()
    ref, art = FakeLM(3, None, 0, False), FakeLM(3, None, 0, False)
    gen = compare_generation(ref, art, tok)
    assert ref.fed[0] == [1, 3, 4]  # the prompt through the tokenizer, not BOS alone
    assert gen["prompt"] == PROMPT and gen["prompt_tokens"] == [1, 3, 4]
    assert gen["matching_prefix"] == GENERATE_TOKENS and gen["first_difference"] is None and gen["text"] == gen["fp32_text"]
    assert generation_line(gen) == f"greedy text after 'Once upon a time': the same {GENERATE_TOKENS} tokens as fp32"


def test_a_near_tie_flipped_at_the_second_token():
    tok = FakeTokenizer()
    ref, art = FakeLM(3, 1, 0.1, False), FakeLM(3, 1, 0.1, True)
    gen = compare_generation(ref, art, tok)
    assert gen["matching_prefix"] == 1 and gen["first_difference"] == 2
    assert abs(gen["fp32_margin_nats"] - 0.1) < 1e-4  # fp32's log-probability of its token minus the artifact's
    assert gen["fp32_text"] != gen["text"]
    line = generation_line(gen)
    assert line == (f"greedy text after 'Once upon a time': first differs from fp32 at token 2 of {GENERATE_TOKENS}, "
                    "a near-tie (fp32 preferred its token by 0.10 nats: expected after quantization); "
                    "both texts: lowbit inspect")
    assert "tokens match" not in line


def test_a_clear_preference_is_not_called_a_near_tie():
    gen = {"prompt": PROMPT, "tokens": 32, "matching_prefix": 0, "first_difference": 1,
           "fp32_margin_nats": NEAR_TIE + 2, "fp32_text": "a", "text": "b"}
    assert ("first differs from fp32 at token 1 of 32, not a near-tie (fp32 preferred its token by 2.50 nats); "
            "both texts: lowbit inspect") in generation_line(gen)


def test_an_old_manifest_without_prompt_or_margin_still_reads():
    gen = {"tokens": 32, "matching_prefix": 1, "fp32_text": "a", "text": "b"}
    assert generation_line(gen) == "greedy text: first differs from fp32 at token 2 of 32; both texts: lowbit inspect"


def test_the_short_form_for_a_table_beside_both_texts():
    gen = {"prompt": PROMPT, "tokens": 32, "matching_prefix": 15, "first_difference": 16, "fp32_margin_nats": 0.09}
    assert generation_line(gen, short=True) == ("first differs from fp32 at token 16 of 32, a near-tie (fp32 preferred "
                                                "its token by 0.09 nats: expected after quantization)")
