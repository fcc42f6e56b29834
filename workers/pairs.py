"""Scoring pairs: a prompt and each continuation as token ids, exactly as lm-evaluation-harness
makes them. Free of torch: a remote model's worker encodes its pairs with the tokenizer alone."""

from workers.engine_jobs import Pair


class PairEncoder:
    """Prompt/continuation token pairs exactly as lm-eval's `TemplateLM._encode_pair` and
    `loglikelihood` make them, with this model's tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id: int = bos if bos is not None else eos
        self.prefix_text: str = tokenizer.decode(self.prefix_token_id)

    def encode(self, text: str) -> list[int]:
        # A text that already starts with the BOS text gets no second one.
        if self.prefix_text and text.startswith(self.prefix_text):
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(text))

    def pair(self, context: str, continuation: str) -> Pair:
        return self.pairs(context, [continuation])[0]

    def pairs(self, context: str, continuations: list[str]) -> list[Pair]:
        """One pair per continuation; the context is encoded once for all of them (an MMLU
        prompt is a few thousand characters, its continuations ` A` … ` D`)."""
        if context == "":
            return [self._after_prefix(continuation) for continuation in continuations]
        spaces = len(context) - len(context.rstrip())
        moved = context[-spaces:] if spaces else ""
        context = context[: len(context) - spaces]
        context_ids = self.encode(context)
        return [
            (context_ids, self.encode(context + moved + continuation)[len(context_ids) :])
            for continuation in continuations
        ]

    def _after_prefix(self, continuation: str) -> Pair:
        tokens = list(self.tokenizer.encode(continuation, add_special_tokens=False))
        if tokens and tokens[0] == self.prefix_token_id:
            return tokens[:1], tokens[1:]
        return [self.prefix_token_id], tokens
