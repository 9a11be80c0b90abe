"""Words -> sub-token windows, label alignment, and batches; shared by training and inference."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .progress import bar as progress_bar

IGNORE = -100


@dataclass(frozen=True)
class Window:
    """Sub-tokens of one sentence (or of one window of a long sentence).

    ``word_ids`` hold absolute word indices of the sentence; the window is responsible for the words in
    ``[first, last)``: those are where it is most central, so every word is predicted and labelled once.
    """

    sentence: int
    input_ids: tuple[int, ...]
    word_ids: tuple[int | None, ...]
    first: int
    last: int
    type_ids: tuple[int, ...] | None = None
    """With ``--case``: a token type per sub-token, 1 where its word has an upper-case letter (see ``case_bits``)."""


def case_bit(word: str) -> int:
    """1 where a word has an upper-case letter: what an uncased tokenizer's lower-casing erases (``IL-2``, ``Ets``
    and ``il``, ``ets`` read alike), given back to the model as BERT's token type (see ``--case``)."""
    return 1 if any(c.isupper() for c in word) else 0


CASE_NOTE = (
    "the model was trained with --case: token_type_ids must be 1 for every sub-token of a word with an upper-case "
    "letter and 0 elsewhere (special tokens, padding); a transformers pipeline passes the tokenizer's all-zero token "
    "types, so it reads every word as lower-case and its predictions differ from loratag's"
)


def case_bits(words: Sequence[str], word_ids: Sequence[int | None]) -> tuple[int, ...]:
    """Each sub-token's ``case_bit`` of its word (0 for special tokens)."""
    return tuple(0 if w is None else case_bit(words[w]) for w in word_ids)


def align_labels(
    word_ids: Sequence[int | None], word_tags: Sequence[int], first: int = 0, last: int | None = None
) -> list[int]:
    """Label the first sub-token of each owned word; special tokens, continuations and words owned by
    another window get IGNORE.

    >>> align_labels([None, 0, 0, 1, None], [3, 0])
    [-100, 3, -100, 0, -100]
    """
    last = len(word_tags) if last is None else last
    out, prev = [], None
    for w in word_ids:
        out.append(word_tags[w] if w is not None and w != prev and first <= w < last else IGNORE)
        prev = w
    return out


def plan_windows(counts: Sequence[int], budget: int) -> list[tuple[int, int, int, int]]:
    """Split words with ``counts[i]`` sub-tokens into overlapping windows of at most ``budget`` sub-tokens.

    Returns ``(start, end, first, last)`` word ranges: the window covers ``[start, end)`` and owns
    ``[first, last)``. Each window starts about half a window (in sub-tokens) after the previous one (flair's
    stride of half the length), and always far enough on to take in the first word the previous one could not,
    so windows never creep forward by less. Each word is owned by the window where it is most central: where
    the smaller of its distances, in sub-tokens, to the window's two ends is largest. A single word longer than
    the budget gets a window of its own (its tail is cut; only its first sub-token is ever labelled).

    >>> plan_windows([1, 1, 1, 1, 1, 1], 4)
    [(0, 4, 0, 3), (2, 6, 3, 6)]
    """
    n = len(counts)
    pos = [0]  # pos[i]: sub-tokens before word i
    for c in counts:
        pos.append(pos[-1] + c)
    spans: list[tuple[int, int]] = []
    s = 0
    while True:
        e = s + 1
        while e < n and pos[e + 1] - pos[s] <= budget:
            e += 1
        spans.append((s, e))
        if e >= n:
            break
        # the next start: the first word at or past the half-way sub-token, moved on until word e fits in
        ns = s + 1
        while ns < e and pos[ns] < pos[s] + (pos[e] - pos[s]) // 2:
            ns += 1
        while ns < e and pos[e + 1] - pos[ns] > budget:
            ns += 1
        s = ns
    return _assign_owners(spans, pos)


def _assign_owners(spans: list[tuple[int, int]], pos: list[int]) -> list[tuple[int, int, int, int]]:
    """Give each word to the covering window where it is most central (ties: the earlier window). Window
    centres increase with the window index, so every window owns one contiguous run of words."""
    owner, j = [], 0
    for w in range(len(pos) - 1):
        centre = (pos[w] + pos[w + 1]) / 2
        best, best_c = None, None
        for k in range(j, len(spans)):
            s, e = spans[k]
            if s > w:
                break
            if w < e:
                c = min(centre - pos[s], pos[e] - centre)
                if best_c is None or c > best_c:
                    best, best_c = k, c
        owner.append(best)
        j = best
    out = []
    for k, (s, e) in enumerate(spans):
        mine = [w for w in range(s, e) if owner[w] == k]
        first = mine[0] if mine else (out[-1][3] if out else 0)
        out.append((s, e, first, mine[-1] + 1 if mine else first))
    return out


Context = tuple[Sequence[str], Sequence[str]]
"""A sentence's document context: the words before it and after it in its document (nearest last / first)."""


def document_contexts(sentences: Sequence[Sequence[str]], docs: Sequence | None, words: int) -> list[Context] | None:
    """Per sentence, up to ``words`` words of the sentences before and after it in the same document: neighbours
    in ``sentences`` with the same ``docs`` key (None: a sentence alone). Words, not sub-tokens, so that any caller
    can cut contexts before tokenizing (each word is at least one sub-token, so ``words`` >= the sub-token budget
    always suffices). None when there is no document or no context."""
    if not words or docs is None:
        return None
    out: list[Context] = []
    for i, key in enumerate(docs):
        left: list[str] = []
        j = i - 1
        while key is not None and j >= 0 and docs[j] == key and len(left) < words:
            left[:0] = sentences[j]
            j -= 1
        right: list[str] = []
        j = i + 1
        while key is not None and j < len(docs) and docs[j] == key and len(right) < words:
            right.extend(sentences[j])
            j += 1
        out.append((left[-words:], right[:words]))
    return out


def _body(ids: Sequence[int], wids: Sequence[int | None]) -> tuple[int, int]:
    """Where a tokenized sequence's words lie: ``[a, b)`` between the leading and trailing special tokens."""
    words = [k for k, w in enumerate(wids) if w is not None]
    return (words[0], words[-1] + 1) if words else (len(ids), len(ids))


def _token_ids(tokenizer, texts: Sequence[Sequence[str]]) -> tuple[list[list[int]], list[tuple[int, ...]]]:
    """Sub-token ids of pre-split words, without special tokens (empty for no words), and their ``case_bits``."""
    keep = [i for i, t in enumerate(texts) if t]
    out: list[list[int]] = [[] for _ in texts]
    bits: list[tuple[int, ...]] = [() for _ in texts]
    for c in range(0, len(keep), 2048):
        part = keep[c : c + 2048]
        enc = tokenizer([list(texts[i]) for i in part], is_split_into_words=True, add_special_tokens=False)
        for j, (i, ids) in enumerate(zip(part, enc["input_ids"])):
            out[i] = ids
            bits[i] = case_bits(texts[i], enc.word_ids(j))
    return out, bits


def with_context(
    window: Window, tokens: int, max_length: int, left_ids, right_ids, left_bits=None, right_bits=None
) -> Window:
    """``window`` (a whole sentence) with up to ``tokens`` sub-tokens of its document on each side, inside the
    special tokens (FLERT: Schweter & Akbik 2020). Context sub-tokens have no word id, so they are never labelled
    nor read out: the sentence's labels, loss and predictions stay its own. Sides share what ``max_length`` leaves."""
    ids, wids = window.input_ids, window.word_ids
    room = max_length - len(ids)
    left, right = left_ids[window.sentence], right_ids[window.sentence]
    n_left, n_right = min(tokens, len(left)), min(tokens, len(right))
    if n_left + n_right > room:  # share the room, giving a short side's spare to the other
        n_left = min(n_left, max(room // 2, room - n_right))
        n_right = min(n_right, room - n_left)
    if n_left <= 0 and n_right <= 0:
        return window
    a, b = _body(ids, wids)
    left_part = tuple(left[len(left) - n_left :]) if n_left > 0 else ()
    right_part = tuple(right[:n_right]) if n_right > 0 else ()
    new_ids = ids[:a] + left_part + ids[a:b] + right_part + ids[b:]
    new_wids = wids[:a] + (None,) * len(left_part) + wids[a:b] + (None,) * len(right_part) + wids[b:]
    types = window.type_ids
    if types is not None:  # the context's sub-tokens carry their own words' case
        lb, rb = left_bits[window.sentence], right_bits[window.sentence]
        lt = tuple(lb[len(lb) - n_left :]) if n_left > 0 else ()
        rt = tuple(rb[:n_right]) if n_right > 0 else ()
        types = types[:a] + lt + types[a:b] + rt + types[b:]
    return Window(window.sentence, new_ids, new_wids, window.first, window.last, types)


def encode(
    tokenizer,
    sentences: Sequence[Sequence[str]],
    max_length: int,
    progress: bool = False,
    contexts: Sequence[Context] | None = None,
    context: int | Sequence[int] = 0,
    case: bool | Sequence[bool] = False,
) -> tuple[list[Window], int]:
    """Tokenize pre-split words; sentences longer than ``max_length`` become overlapping windows.

    Returns the windows in sentence order and how many sentences needed more than one window.
    A word the tokenizer turns into nothing (control characters, zero-width spaces) is replaced by the
    unknown token, so every word keeps a first sub-token and a prediction. ``contexts`` (``document_contexts``)
    and ``context`` (sub-tokens per side; one for all or one per sentence): each sentence that fits whole is
    read with its document around it (``with_context``); a windowed sentence is its own context. ``case`` (one
    for all or one per sentence): each sub-token's ``case_bit`` as its token type (``Window.type_ids``).
    """
    sentences = [list(s) for s in sentences]
    windows, windowed = _encode(tokenizer, sentences, max_length, progress)
    cased = [case] * len(sentences) if isinstance(case, bool) else list(case)
    if any(cased):
        windows = [
            Window(w.sentence, w.input_ids, w.word_ids, w.first, w.last, case_bits(sentences[w.sentence], w.word_ids))
            if cased[w.sentence]
            else w
            for w in windows
        ]
    sizes = [context] * len(sentences) if isinstance(context, int) else list(context)
    if contexts is None or not any(sizes):
        return windows, windowed
    left_ids, left_bits = _token_ids(tokenizer, [c[0] for c in contexts])
    right_ids, right_bits = _token_ids(tokenizer, [c[1] for c in contexts])
    per_sentence = Counter(w.sentence for w in windows)
    return [
        with_context(w, sizes[w.sentence], max_length, left_ids, right_ids, left_bits, right_bits)
        if per_sentence[w.sentence] == 1 and sizes[w.sentence] > 0
        else w
        for w in windows
    ], windowed


def _encode(tokenizer, sentences: list[list[str]], max_length: int, progress: bool) -> tuple[list[Window], int]:
    """``encode`` without document context."""
    budget = max_length - tokenizer.num_special_tokens_to_add()
    windows: list[Window] = []
    windowed = 0
    chunk = 2048
    bar = progress_bar(len(sentences), "tokenize", "sent", progress)
    for i, words in enumerate(sentences):
        if i % chunk == 0:  # the fast tokenizer works in batches; chunks keep the progress bar moving
            enc = tokenizer(sentences[i : i + chunk], is_split_into_words=True, add_special_tokens=True)
            bar.update(len(enc["input_ids"]))
        ids, wids = enc["input_ids"][i % chunk], enc.word_ids(i % chunk)
        counts = [0] * len(words)
        for w in wids:
            if w is not None:
                counts[w] += 1
        if 0 in counts:
            words = [w if c else (tokenizer.unk_token or "[UNK]") for w, c in zip(words, counts)]
            one = tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=False)
            ids, wids = one["input_ids"], one.word_ids()
            counts = [max(1, sum(1 for w in wids if w == k)) for k in range(len(words))]
        if len(ids) <= max_length:
            windows.append(Window(i, tuple(ids), tuple(wids), 0, len(words)))
            continue
        windowed += 1
        for s, e, first, last in plan_windows(counts, budget):
            part = tokenizer(
                words[s:e], is_split_into_words=True, add_special_tokens=True, truncation=True, max_length=max_length
            )
            shifted = tuple(None if w is None else w + s for w in part.word_ids())
            windows.append(Window(i, tuple(part["input_ids"]), shifted, first, last))
    bar.close()
    return windows, windowed


def padded_length(longest: int, multiple: int = 8) -> int:
    """The padded length of a batch whose longest row is ``longest``: rounded up to ``multiple``."""
    return -(-longest // multiple) * multiple


def collate(windows: Sequence[Window], pad_id: int, labels: Sequence[Sequence[int]] | None = None, multiple: int = 8):
    """Dynamic padding to the longest window in the batch, rounded up to ``multiple``."""
    import torch

    length = padded_length(max(len(w.input_ids) for w in windows), multiple)
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for r, w in enumerate(windows):
        ids[r, : len(w.input_ids)] = torch.tensor(w.input_ids)
        mask[r, : len(w.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if any(w.type_ids is not None for w in windows):  # --case: a window without types (another adapter's) is all 0
        types = torch.zeros((len(windows), length), dtype=torch.long)
        for r, w in enumerate(windows):
            if w.type_ids is not None:
                types[r, : len(w.type_ids)] = torch.tensor(w.type_ids)
        batch["token_type_ids"] = types
    if labels is not None:
        lab = torch.full((len(windows), length), IGNORE, dtype=torch.long)
        for r, w in enumerate(windows):
            lab[r, : len(w.input_ids)] = torch.tensor(align_labels(w.word_ids, labels[w.sentence], w.first, w.last))
        batch["labels"] = lab
    return batch


def batches(
    lengths: Sequence[int],
    batch_size: int,
    batch_tokens: int | None = None,
    seed: int = 0,
    group: bool = True,
) -> list[list[int]]:
    """Training batches of indices, shuffled reproducibly by ``seed``; with ``group``: sentences of similar
    length together (sorted inside pools of 50 batches, batches then shuffled), which removes most padding.
    ``batch_tokens`` caps the padded size (rows x longest) instead of a fixed row count. Inference batches:
    ``inference_batches``."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    if not group:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pool = 50 * (batch_size if batch_tokens is None else max(1, batch_tokens // 32))
    out: list[list[int]] = []
    for p in range(0, len(order), pool):
        cur: list[int] = []
        for i in sorted(order[p : p + pool], key=lambda i: lengths[i]):
            # sorted ascending, so lengths[i] is the longest row of the batch if i joins it
            full = len(cur) >= batch_size if batch_tokens is None else lengths[i] * (len(cur) + 1) > batch_tokens
            if cur and full:
                out.append(cur)
                cur = []
            cur.append(i)
        if cur:
            out.append(cur)
    rng.shuffle(out)
    return out


PASS_TOKENS = 64  # a forward pass's fixed cost, in tokens of work (see inference_batches)


def inference_batches(
    lengths: Sequence[int], max_rows: int, per_batch_tokens: int = PASS_TOKENS, multiple: int = 8
) -> list[list[int]]:
    """Index batches for inference: sorted by length and cut where the padded work is least.

    Minimises, over cuts of the length-sorted order into batches of at most ``max_rows`` rows, the sum of
    ``per_batch_tokens + rows x padded length`` (``per_batch_tokens``: a forward pass's fixed cost, in tokens
    of work; MiniLM on 2 CPU cores: a batch-1 forward costs what ~50-100 more tokens in a batch cost). Cutting
    every ``max_rows`` rows instead pads a small mixed-length batch (a server's) to its longest row: half the
    work was padding there. Written by hand: a 1-D dynamic programme over sorted lengths, O(n x max_rows).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    padded = [-(-lengths[i] // multiple) * multiple for i in order]
    n = len(order)
    cost = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = padded[j - 1]  # ascending, so the last row of a batch is its longest
        for i in range(max(0, j - max_rows), j):
            c = cost[i] + per_batch_tokens + (j - i) * longest
            if c < cost[j]:
                cost[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]
