"""The page allocator and the prefix cache, without a model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from maxlike.kv_cache import KVCacheParams, OutOfPagesError, PagedKVCacheManager
from maxlike.sharding import MESH_AXES


def manager(pages: int, caching: bool = True) -> PagedKVCacheManager:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
    return PagedKVCacheManager(KVCacheParams(1, 1, 4, 4, "float32"), pages, mesh, allocate=False,
                               enable_prefix_caching=caching)


def test_pages_are_claimed_grown_and_returned():
    kv = manager(5, caching=False)  # 4 usable pages of 4 tokens
    kv.claim("a")
    kv.reserve("a", 6)
    assert kv.num_pages_of("a") == 2 and kv.free_pages == 2
    assert kv.pages_short("a", 20) == 3 - 2  # needs 5 pages, holds 2, 2 free
    with pytest.raises(OutOfPagesError):
        kv.reserve("a", 20)
    table = kv.page_table(["a", None], 4)
    assert 0 not in table[0, :2] and (table[0, 2:] == 0).all() and (table[1] == 0).all()
    kv.release("a")
    assert kv.free_pages == 4


def test_prefix_pages_are_shared_refcounted_and_evicted_lru():
    kv = manager(7)  # 6 usable pages
    a = np.arange(13)  # 3 full pages + 1 token
    assert kv.claim("a", a) == 0
    kv.reserve("a", 13)
    kv.commit("a", a, 13)
    assert kv.claim("b", a) == 12, "three full pages hit; the last token is always computed"
    assert kv.num_pages_of("b") == 3 and kv.pages_in_use == 4
    kv.release("a")
    assert kv.pages_in_use == 3, "b still holds the shared pages"
    kv.release("b")
    assert kv.pages_in_use == 0 and kv.free_pages == 6, "cached pages count as free"
    c = np.arange(100, 113)
    kv.claim("c", c)
    kv.reserve("c", 24)  # 6 pages: 3 free + the 3 cached ones evicted
    assert kv.claim("d", a) == 0, "evicted pages no longer match"
    assert kv.prefix_cache.stats.hit_rate == pytest.approx(12 / (13 + 13 + 13 + 13))


def test_a_diverging_prefix_matches_only_its_common_pages():
    kv = manager(9)
    a = np.arange(17)
    kv.claim("a", a)
    kv.reserve("a", 17)
    kv.commit("a", a, 16)
    b = a.copy()
    b[5] = 999  # differs in the second page
    assert kv.claim("b", b) == 4


@pytest.mark.parametrize("tokens", [1, 5])
def test_kv_write_variants_agree(tokens):
    """The accelerator KV write (one scatter) equals the CPU one (plus a null-slot write)."""
    from graphs.attention import write_kv

    rng = np.random.default_rng(tokens)
    pages = rng.normal(size=(6, 4, 2, 8)).astype(np.float32)
    new = rng.normal(size=(2, tokens, 2, 8)).astype(np.float32)
    slots = rng.choice(np.arange(4, 24), size=(2, tokens), replace=False).astype(np.int32)  # pages 1-5
    cpu, accel = (np.asarray(write_kv(jax.numpy.asarray(pages[None, None]), new, slots, backend=b))[0, 0]
                  for b in ("cpu", "gpu"))
    expect = pages.reshape(24, 2, 8).copy()
    expect[slots.reshape(-1)] = new.reshape(-1, 2, 8)
    np.testing.assert_array_equal(accel.reshape(24, 2, 8)[4:], expect[4:])
    np.testing.assert_array_equal(cpu[1:], accel[1:])  # page 0 (null) may differ: nothing reads it


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_stacked_pool_is_written_and_read_at_a_traced_layer(replicas):
    """Layers as one loop index one [R, L, N, S, KV, D] pool: only layer `layer`'s slots change,
    and a gather reads that layer's pages (numpy written out as the reference)."""
    from graphs.attention import gather_pages, write_kv

    rng = np.random.default_rng(replicas)
    pages = rng.normal(size=(replicas, 3, 6, 4, 2, 8)).astype(np.float32)
    new = rng.normal(size=(replicas * 2, 3, 2, 8)).astype(np.float32)
    # Distinct slots within each replica (its two rows write one pool: a repeated slot has no defined winner).
    slots = np.concatenate([rng.choice(np.arange(4, 24), size=(2, 3), replace=False)
                            for _ in range(replicas)]).astype(np.int32)
    table = rng.integers(1, 6, size=(replicas * 2, 4)).astype(np.int32)

    @jax.jit
    def run(pages, layer):
        written = write_kv(pages, new, slots, layer, backend="gpu")
        return written, gather_pages(written, table, layer)

    written, gathered = (np.asarray(a) for a in run(jax.numpy.asarray(pages), jax.numpy.int32(1)))
    expect = pages.copy()
    for row in range(replicas * 2):
        r = row // 2  # rows grouped by replica
        flat = expect[r, 1].reshape(24, 2, 8)
        flat[slots[row]] = new[row]
        expect[r, 1] = flat.reshape(6, 4, 2, 8)
    np.testing.assert_array_equal(written, expect)
    ref = np.stack([expect[row // 2, 1][table[row]].reshape(16, 2, 8) for row in range(replicas * 2)])
    np.testing.assert_array_equal(gathered, ref)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("backend", ["cpu", "tpu", "gpu"])
@pytest.mark.parametrize("t", [1, 2])  # decode, prefill
@pytest.mark.parametrize("furthest", [2, 4, 7, 13, 30])  # pages reached: 1, 1, 2, 4, 8 of 8
def test_decode_attention_reads_as_many_pages_as_the_furthest_query_needs(furthest, t, backend, window):
    """One page-table width for every context: decode attention picks the prefix of the table it
    reads on device (prefill: the next test). Against a dense softmax written out in numpy, for
    queries reaching 1 to 8 pages (pages past the furthest query hold garbage that must not matter).
    The "tpu" graph (run here on CPU) keeps the gathered pages [B, L, KV x D] behind an optimization
    barrier (else XLA:TPU copies a layer's pool to gather it head by head); the values are the same.
    On GPU (one width, an executable per width there) the whole table. With a window of 6 keys
    (3 pages of 4 at most) decode reads each row's window wherever it lies: pages before it hold NaN."""
    _check_decode_attention(furthest, t, backend, window, window)


@pytest.mark.parametrize("window", [6, 0])
@pytest.mark.parametrize("furthest", [4, 13, 30])
def test_decode_attention_in_a_traced_window_reads_the_window_or_the_prefix(furthest, window):
    """With the layers as one loop a layer's window is an array (0: full attention) and the widest
    window of any layer (6) is static: a sliding layer reads its window's pages past them (pages
    before each row's window hold NaN), a full layer the table's prefix."""
    import jax.numpy as jnp

    _check_decode_attention(furthest, 1, "cpu", jnp.int32(window), window, max_window=6)


def _check_decode_attention(furthest, t, backend, window, plain_window, **kw):
    """`window` as paged_attention takes it; `plain_window` the same as an int (or None)."""
    from functools import partial

    from graphs.attention import paged_attention

    paged_attention = partial(paged_attention, backend=backend, window=window, **kw)
    window = plain_window

    rng = np.random.default_rng(furthest)
    s, n, kv, g, d, b = 4, 25, 2, 3, 8, 3
    k_pages = rng.normal(size=(1, 1, n, s, kv, d)).astype(np.float32)
    v_pages = rng.normal(size=(1, 1, n, s, kv, d)).astype(np.float32)
    table = rng.permutation(np.arange(1, n)).reshape(b, 8).astype(np.int32)  # rows hold pages of their own
    q = rng.normal(size=(b, t, kv * g, d)).astype(np.float32)
    q_pos = np.stack([rng.integers(0, furthest + 1, size=t) for _ in range(b)]).astype(np.int32)
    q_pos[0, -1] = furthest
    for row in range(b if window and t == 1 else 0):
        before = max(0, q_pos[row, 0] - window + 1) // s  # pages wholly before the row's window
        k_pages[0, 0][table[row, :before]] = v_pages[0, 0][table[row, :before]] = np.nan
    with jax.default_matmul_precision("highest"):  # float32 products on every backend (GPUs default to TF32)
        out = np.asarray(jax.jit(paged_attention)(q, k_pages, v_pages, table, q_pos))
    if t == 1 and backend != "gpu":  # the decode form holds one branch per width
        assert jax.jit(paged_attention).lower(q, k_pages, v_pages, table, q_pos).as_text().count("case") >= 1
    barrier = "optimization_barrier" in str(jax.make_jaxpr(paged_attention)(q, k_pages, v_pages, table, q_pos))
    assert barrier == (backend == "tpu")  # (b = 3 rows: one row has no barrier)
    for row in range(b):
        keys = k_pages[0, 0][table[row]].reshape(8 * s, kv, d)
        values = v_pages[0, 0][table[row]].reshape(8 * s, kv, d)
        for i in range(t):
            for h in range(kv * g):
                seen = slice(max(0, q_pos[row, i] - window + 1) if window else 0, q_pos[row, i] + 1)
                logits = keys[seen, h // g] @ q[row, i, h] / np.sqrt(d)
                weights = np.exp(logits - logits.max())
                expect = (weights / weights.sum()) @ values[seen, h // g]
                np.testing.assert_allclose(out[row, i, h], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 2.0), (0, None)])
@pytest.mark.parametrize("furthest", [3, 9, 26])  # key blocks reached: 1, 2, 4 of 4
def test_prefill_attention_reads_key_blocks_up_to_the_furthest_query(furthest, window, softcap, backend,
                                                                     monkeypatch):
    """Prefill steps attend KEY_BLOCK keys at a time (set to 2 pages of 4 here), as many blocks as
    the furthest query reaches, with an online softmax. Against a softmax written out in numpy
    (scale, Gemma 2's soft-cap, HF's sliding window: a query sees itself and window - 1 keys back;
    0 is full attention), over a 7-page table (the last block padded) and 2 replicas; the pages of
    a row's blocks past its furthest query hold NaN, so reading one fails the test."""
    _check_prefill_attention(furthest, window, softcap, backend, monkeypatch, blocks=True)


@pytest.mark.parametrize("whole_table_bytes,furthest", [(13439, 9), (13439, 26), (13440, 26)])
def test_gpu_prefill_attention_reads_key_blocks_past_its_whole_table_scores(whole_table_bytes, furthest,
                                                                           monkeypatch):
    """On GPU a prefill step reads the whole table while its float32 scores stay within
    GPU_WHOLE_TABLE_SCORE_BYTES (one product, no loop whose count XLA:GPU would read on the host),
    and key blocks past it (a [queries, max_length] score matrix would not fit at long max_length).
    Here 4 rows x 5 tokens x 6 heads over 28 keys: 13,440 bytes."""
    from graphs import attention

    monkeypatch.setattr(attention, "GPU_WHOLE_TABLE_SCORE_BYTES", whole_table_bytes)
    _check_prefill_attention(furthest, 6, None, "gpu", monkeypatch, blocks=whole_table_bytes < 13440)


@pytest.mark.parametrize("starts", [[20, 22, 21, 20], [21, 23, 22, 21], [21, -1, 9, 19]],
                         ids=["block1", "block2", "padding"])
@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_windowed_prefill_attention_skips_the_blocks_before_every_window(starts, backend, traced, monkeypatch):
    """With a window each row's loop starts at the first block its own window reaches: rows whose
    queries start at `starts` (-1: a padding row, every position 0) with a window of 6 (a static
    int, or an array as a scanned Gemma layer passes it). A row starting at 20 sees keys from 15
    on (block 1 of 8 keys: block 0's pages hold NaN), at 21 from 16 on (block 2: blocks 0 and 1
    hold NaN). A padding row, or a short one, does not make the others read from block 0."""
    import jax.numpy as jnp

    window = jnp.int32(6) if traced else 6
    starts = np.array(starts)
    _check_prefill_attention(starts.max() + 4, window, None, backend, monkeypatch, blocks=True, starts=starts)


def _check_prefill_attention(furthest, window, softcap, backend, monkeypatch, *, blocks: bool, starts=None):
    from functools import partial

    from graphs import attention

    monkeypatch.setattr(attention, "KEY_BLOCK", 8)
    attend = jax.jit(partial(attention.paged_attention, backend=backend, window=window, softcap=softcap))
    rng = np.random.default_rng(furthest)
    r, s, n, kv, g, d, b, t, p = 2, 4, 16, 2, 3, 8, 4, 5, 7
    k_pages = rng.normal(size=(r, 2, n, s, kv, d)).astype(np.float32)
    v_pages = rng.normal(size=(r, 2, n, s, kv, d)).astype(np.float32)
    # the two rows of a replica hold pages of their own (so poisoning one's pages leaves the other's)
    table = np.concatenate([rng.permutation(np.arange(1, n))[:2 * p].reshape(2, p) for _ in range(r)]).astype(np.int32)
    q = rng.normal(size=(b, t, kv * g, d)).astype(np.float32)
    q_pos = np.sort(rng.integers(0, furthest + 1, size=(b, t)), axis=1).astype(np.int32)
    q_pos[1, -1] = furthest
    skipped = np.zeros(b, int)  # each row's blocks before its first query's window
    if starts is not None:  # each row's queries from its start on (-1: a padding row, all at position 0)
        q_pos = np.where(starts[:, None] < 0, 0, starts[:, None] + np.arange(t)).astype(np.int32)
        skipped = np.maximum(starts - int(window) + 1, 0) // 8
        assert skipped.max() >= 2 and q_pos.max() == furthest
    for row in range(b if blocks else 0):  # rows grouped by replica: row // 2
        reached = q_pos[row].max() // 8 + 1  # the row's blocks of 2 pages
        for pages in (k_pages, v_pages):
            pages[row // 2, 1][table[row, 2 * reached:]] = np.nan
            pages[row // 2, 1][table[row, :2 * skipped[row]]] = np.nan
    with jax.default_matmul_precision("highest"):
        out = np.asarray(attend(q, k_pages, v_pages, table, q_pos, 1))
    jaxpr = str(jax.make_jaxpr(attend)(q, k_pages, v_pages, table, q_pos, 1))
    assert ("while" in jaxpr) == blocks and ("optimization_barrier" in jaxpr) == (backend == "tpu")  # (4 rows)
    for row in range(b):
        keys = k_pages[row // 2, 1][table[row]].reshape(p * s, kv, d)
        values = v_pages[row // 2, 1][table[row]].reshape(p * s, kv, d)
        for i in range(t):
            first = max(0, q_pos[row, i] - int(window) + 1) if window else 0
            seen = slice(first, q_pos[row, i] + 1)
            for h in range(kv * g):
                logits = keys[seen, h // g] @ q[row, i, h] / np.sqrt(d)
                if softcap:
                    logits = softcap * np.tanh(logits / softcap)
                weights = np.exp(logits - logits.max())
                expect = (weights / weights.sum()) @ values[seen, h // g]
                np.testing.assert_allclose(out[row, i, h], expect, rtol=1e-5, atol=1e-5)


def test_misuse_of_pages_is_an_error_that_names_the_request():
    kv = manager(6, caching=False)
    with pytest.raises(ValueError, match="request 'ghost' holds no KV pages"):
        kv.release("ghost")
    with pytest.raises(ValueError, match="request 'ghost' holds no KV pages"):
        kv.reserve("ghost", 4)
    kv.claim("a", total_tokens=8)
    with pytest.raises(ValueError, match="request 'a' already holds KV pages"):
        kv.claim("a")
    with pytest.raises(OutOfPagesError):
        kv.claim("b", total_tokens=100)
    assert not kv.contains("b") and kv.free_pages == 3, "a failed claim holds nothing"
    pages = kv.pages_of("a")
    allocator, _ = kv.replica_state(0)
    with pytest.raises(ValueError, match=r"pages \[(\d+), \1\] are released twice"):
        allocator.release(pages[:1] + pages[:1])
    kv.release("a")
    with pytest.raises(ValueError, match=r"are released twice or are not pages of this pool"):
        allocator.release(pages[:1])
    with pytest.raises(ValueError, match=r"not pages of this pool \(1\.\.5\)"):
        allocator.release([0])


def _check_invariants(kv: PagedKVCacheManager, contents: dict[str, list]) -> None:
    """Every page is free, cached or held; a page two requests hold is a cached, shared one with
    the same tokens in both; free + in use = the pool."""
    allocator, cache = kv.replica_state(0)
    free = allocator.free_ids()
    cached = cache.cached_pages() if cache else {}
    holders: dict[int, list[str]] = {}
    for rid in kv.requests():
        for i, page in enumerate(kv.pages_of(rid)):
            holders.setdefault(page, []).append((rid, i))
    assert len(free) == len(set(free)) and 0 not in free
    assert not set(free) & set(holders) and not set(free) & set(cached), "a free page is also in use"
    assert set(free) | set(holders) | set(cached) == set(range(1, kv.num_pages)), "a page went missing"
    for page, owners in holders.items():
        if len(owners) > 1:
            assert page in cached, f"page {page} is shared by {owners} but not a cached page"
            blocks = {tuple(contents[rid][i * 4:(i + 1) * 4]) for rid, i in owners}
            assert len(blocks) == 1, f"page {page} holds different tokens for {owners}"
        if page in cached:
            assert cached[page] >= len(owners)
    unheld = [p for p, refs in cached.items() if refs == 0]
    assert kv.free_pages == len(free) + len(unheld)
    assert kv.free_pages + kv.pages_in_use == kv.num_pages - 1


@pytest.mark.parametrize("caching", [False, True])
def test_allocator_invariants_hold_under_random_use(caching):
    """Thousands of claims, growths, commits, preemptions (release mid-sequence) and finishes,
    with prompts that share prefixes: the invariants hold after every operation."""
    rng = np.random.default_rng(0)
    kv = manager(40, caching=caching)  # 39 usable pages of 4 tokens
    prefixes = [rng.integers(0, 50, size=12).tolist() for _ in range(3)]
    live: dict[str, list] = {}  # request -> its tokens so far
    written: dict[str, int] = {}
    for step in range(4000):
        op = rng.random()
        if op < 0.3 or not live:
            rid = f"r{step}"
            tokens = (prefixes[rng.integers(3)] if rng.random() < 0.6 else []) + \
                rng.integers(0, 50, size=int(rng.integers(1, 10))).tolist()
            try:
                cached = kv.claim(rid, tokens, total_tokens=len(tokens))
            except OutOfPagesError:
                continue
            live[rid], written[rid] = tokens, cached
        else:
            rid = list(live)[int(rng.integers(len(live)))]
            if op < 0.65:  # write what is reserved, offer full pages to the cache, grow by a few tokens
                written[rid] = len(live[rid])
                kv.commit(rid, live[rid], written[rid])
                grown = live[rid] + rng.integers(0, 50, size=int(rng.integers(1, 6))).tolist()
                if kv.pages_short(rid, len(grown)) == 0:
                    kv.reserve(rid, len(grown))
                    live[rid] = grown
            else:  # finish or preempt: either way every page goes back
                kv.release(rid)
                del live[rid], written[rid]
        _check_invariants(kv, live)
    for rid in list(live):
        kv.release(rid)
    _check_invariants(kv, {})
    assert kv.pages_in_use == 0


def test_a_hand_written_loop_cannot_step_past_its_pages(tiny_llama):
    from conftest import build_model
    from maxlike.pipelines.context import TextContext

    model = build_model(tiny_llama[0])
    ctx = TextContext("loop", np.arange(3, 18, dtype=np.int32), 18)  # 15 prompt tokens
    with pytest.raises(ValueError, match="request 'loop' holds no KV pages: claim them"):
        model.prepare_initial_token_inputs([[ctx]])
    model.kv_manager.claim("loop", total_tokens=16)  # one page of 16 tokens
    other = TextContext("other", np.arange(3, 40, dtype=np.int32), 40)
    model.kv_manager.claim("other", total_tokens=16)
    with pytest.raises(ValueError, match=r"request 'other' holds KV pages for 16 tokens but this step writes up to "
                                         r"token 37: reserve them first"):
        model.prepare_initial_token_inputs([[ctx, other]])
    inputs = model.prepare_initial_token_inputs([[ctx]])  # writes tokens 0..14
    out = model.execute(inputs)
    tokens = jax.numpy.argmax(out.next_token_logits, axis=-1).astype(jax.numpy.int32)
    inputs = model.prepare_next_token_inputs(tokens, inputs)  # token 15: the page's last slot
    model.execute(inputs)
    with pytest.raises(ValueError, match=r"request 'loop': the next step would write token 17 but its page table "
                                         r"holds 16: reserve more pages"):
        model.prepare_next_token_inputs(tokens, inputs)
    with pytest.raises(ValueError, match="request 'loop'.*would write token 18 but its page table holds 16"):
        model.execute_decode_loop(inputs, 3, 4, None, np.full((1, model.stop_slots), -1), np.array([5]))
