"""camelid's int8 kernels (native.c) against PyTorch doing the same arithmetic on the dequantized weights.

The kernels round weights to int8 per block of 64 along a row and activations to int8 per block of 32 (to int16
per row for 2 to PANEL_MIN - 1 rows in one call, or a row not a multiple of 64 long); the reference here is
PyTorch's float32 product with the weights rounded the same way, and, where the tests say so, the activations too
(with_int8_inputs), so that what is left is summation order.
"""

import copy
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from camelid import native
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.native import Int8Linear, dequantize, quantize_rows
from camelid.quantize import quantize_model

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="the int8 kernels need a C compiler")


def test_quantize_rows_rounds_each_block_to_its_own_int8_grid():
    torch.manual_seed(0)
    w = torch.randn(37, 150) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different sizes; 64 + 64 + 22
    w[5] = 0  # an all-zero row gets a harmless scale
    w[7, 70] = 100.0  # an outlier coarsens only its own block's grid
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (37, 3) and native.SCALE_BLOCK == 64
    top = F.pad(w, (0, 192 - 150)).view(37, 3, 64).abs().amax(-1)
    torch.testing.assert_close(scale[top > 0], top[top > 0] / 127)
    assert (q[5] == 0).all() and (scale[5] == 1).all()
    assert scale[7, 1] == 100 / 127 and scale[7, 0] < 0.001 and scale[7, 2] < 0.001
    step = scale.repeat_interleave(64, 1)[:, :150]
    assert ((native.dequantize(q, scale) - w).abs() <= step / 2 * (1 + 1e-5)).all()
    expected = torch.round(w / step)  # to nearest, ties to even
    assert (q.float() - expected).abs().max() <= 1 and (q.float() == expected).float().mean() > 0.999


@pytest.mark.parametrize("out_features, in_features", [(64, 64), (50, 37), (300, 200), (7, 4100), (9, 8200),
                                                       (50, 640), (13, 4096)])
@pytest.mark.parametrize("rows", [1, 3, 8, native.PANEL_MIN - 1, native.PANEL_MIN, 70])
def test_int8_linear_equals_the_dequantized_product(out_features, in_features, rows):
    """Shapes cover the vector loops' tails (37, 50, 7 rows), long rows summed in blocks (4100, 8200), groups of
    8 rows with a partial last one (50, 13 rows); batches that use every tile (1, 3, 8), more than one block of
    input rows (70), and either side of PANEL_MIN, from where the weights are copied into panels. One row or
    PANEL_MIN and more, a multiple of 64 long, take int8 inputs; the others int16 ones."""
    g = torch.Generator().manual_seed(out_features * rows)
    w = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    x = torch.randn(rows, in_features, generator=g)
    x[:, 3] *= 50  # an outlier channel, as real activations have
    layer = Int8Linear(w, bias=torch.randn(out_features, generator=g))
    deq = layer.dequantized()
    expected = x @ deq.T + layer.bias
    got = layer(x)
    weights_error = (x @ w.T + layer.bias - expected).norm()  # what rounding the weights to int8 costs
    if (rows == 1 or rows >= native.PANEL_MIN) and in_features % native.SCALE_BLOCK == 0:
        # the inputs rounded to int8 per block of 32, as for 4-bit weights: at most max |block| / 254 each
        step = x.view(rows, -1, 32).abs().amax(-1) / 254
        bound = step @ deq.abs().view(out_features, -1, 32).sum(-1).T * 1.001 + 1e-4
        assert ((got - expected).abs() <= bound).all()
        # and exactly that rounding: the same product of the rounded inputs, to float32's precision
        rounded = int8_rounded(x).double() @ deq.double().T + layer.bias.double()
        assert ((got.double() - rounded).abs() <= 1e-5 * (1 + rounded.abs())).all()
    else:
        # int16 inputs: each row is off by at most |x|max / 65534 per element
        bound = (x.abs().amax(1, keepdim=True) / 65534) * deq.abs().sum(1) + 1e-5
        assert ((got - expected).abs() <= bound).all()
        assert (got - expected).norm() < 0.1 * weights_error < 0.01 * expected.norm()


@pytest.mark.parametrize("out_features, in_features", [(75, 320), (64, 2048), (203, 4160), (9, 16448)])
def test_a_row_s_int8_product_alone_equals_its_product_in_a_prompt(out_features, in_features):
    """One row is read straight from the weights, a prompt's rows through panels: each row's result is the same to
    the bit alone and in a prompt of 20 (75, 203 and 9 rows: a partial last group of 8; 320 and 16448: a row's
    blocks not a multiple of 8)."""
    g = torch.Generator().manual_seed(in_features)
    layer = Int8Linear(torch.randn(out_features, in_features, generator=g) * 0.05,
                       bias=torch.randn(out_features, generator=g))
    x = torch.randn(20, in_features, generator=g)
    full = layer(x)
    for i in range(20):
        assert torch.equal(layer(x[i : i + 1]), full[i : i + 1]), i


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded as the kernels round inputs to int8 (native.c's quantize_input8): each block of 32 along a
    row to the nearest multiple of max |block| / 127 (ties to even)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    top = blocks.abs().amax(-1, keepdim=True)
    step = torch.where(top > 0, (top / 127).clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(top))
    return (torch.round(blocks * (1 / step)) * step).reshape(x.shape)


def with_int8_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """`model` whose nn.Linear layers round their input as the int8 kernels do for one row or a prompt's
    PANEL_MIN rows or more, a multiple of SCALE_BLOCK long: PyTorch's arithmetic on the kernels' int8 inputs."""
    def round_input(module, args):
        x = args[0]
        rows = x.numel() // x.shape[-1]
        if (rows == 1 or rows >= native.PANEL_MIN) and x.shape[-1] % native.SCALE_BLOCK == 0:
            return (int8_rounded(x),)
        return None

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(round_input)
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_and_int4_linear_same_result_on_any_number_of_threads(bits):
    from camelid.native import Int4Linear

    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(203, 96)) if bits == 8 else Int4Linear([torch.randn(208, 96)])
    x = torch.randn(5, 96)
    results = []
    for threads in (1, 2, 3, 5):
        layer.threads = threads
        results.append(layer(x))
    for r in results[1:]:
        assert torch.equal(r, results[0])  # each output is summed by one thread, in the same order


def test_int8_linear_keeps_the_input_shape_and_dtype():
    layer = Int8Linear(torch.randn(10, 16))
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 10)
    assert layer(torch.randn(16, dtype=torch.float64)).dtype == torch.float64


def test_stacked_layers_quantize_each_part_as_alone():
    torch.manual_seed(0)
    parts = [torch.randn(12, 32), torch.randn(4, 32) * 10, torch.randn(4, 32) * 0.1]
    stacked = Int8Linear(parts)
    alone = [Int8Linear(p) for p in parts]
    assert torch.equal(stacked.qweight, torch.cat([a.qweight for a in alone]))
    assert torch.equal(stacked.scale, torch.cat([a.scale for a in alone]))


CONFIGS = {
    "gqa-bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama3-rope": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def dequantized_reference(exact: Llama, small: Llama) -> Llama:
    """`exact` with every linear weight replaced by the int8 model's dequantized one: the same arithmetic in
    PyTorch, on the same rounded weights."""
    ref = copy.deepcopy(exact)
    for block, part in zip(ref.model.layers, small.native.layers):
        attn, mlp = block.self_attn, block.mlp
        qkv, gate_up = part.qkv.dequantized(), part.gate_up.dequantized()
        q_rows, kv_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data = qkv.split(
            [q_rows, kv_rows, kv_rows])
        attn.o_proj.weight.data = part.o.dequantized()
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up.chunk(2)
        mlp.down_proj.weight.data = part.down.dequantized()
    ref.lm_head = torch.nn.Linear(1, 1, bias=False)
    ref.lm_head.weight = torch.nn.Parameter(small.lm_head.dequantized())
    embed = small.model.embed_tokens  # int8 rows too
    ref.model.embed_tokens.weight = torch.nn.Parameter(dequantize(embed.qweight, embed.scale))
    return ref


def int8_model_and_reference(name: str, intermediate: int) -> tuple[ModelConfig, Llama, Llama]:
    """A random 2-layer model of CONFIGS[name]'s kind: its config, its int8 model, and PyTorch on the int8 weights."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=301, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                         max_position_embeddings=64, **CONFIGS[name])
    exact = Llama(config).eval()
    small = quantize_model(copy.deepcopy(exact), "int8")
    return config, small, dequantized_reference(exact, small)


@pytest.mark.parametrize("name", CONFIGS)
def test_native_decoder_equals_pytorch_on_the_same_weights(name):
    """Prefill of rows of different lengths (right-padded), then batched decode steps in which one row has
    finished: the kernels' logits equal PyTorch's on the dequantized weights, and the caches agree."""
    assert 3 * 5 < native.PANEL_MIN
    config, small, ref = int8_model_and_reference(name, intermediate=96)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 301, (3, 5), generator=g)  # 2 to PANEL_MIN - 1 rows a call: int16 inputs throughout
    valid = torch.tensor([5, 2, 4])
    with torch.no_grad():
        caches = [m.new_cache(3, 40) for m in (small, ref)]
        outs = [m(tokens, c, valid=valid) for m, c in zip((small, ref), caches)]
        for b, n in enumerate(valid.tolist()):
            torch.testing.assert_close(outs[0][b, :n], outs[1][b, :n], atol=2e-4, rtol=1e-4)
        for step in range(6):
            feed = torch.randint(0, 301, (3, 1), generator=g)
            live = torch.tensor([1, 1, 0 if step >= 2 else 1])
            outs = [m(feed, c, valid=live) for m, c in zip((small, ref), caches)]
            torch.testing.assert_close(outs[0][live.bool()], outs[1][live.bool()], atol=2e-4, rtol=1e-4)
        assert torch.equal(caches[0].lengths, caches[1].lengths)
        for layer in range(config.num_hidden_layers):
            for b, n in enumerate(caches[0].lengths.tolist()):
                torch.testing.assert_close(caches[0].k[layer][b, :, :n], caches[1].k[layer][b, :, :n], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(caches[0].v[layer][b, :, :n], caches[1].v[layer][b, :, :n], atol=1e-4, rtol=1e-4)
        # without a cache: plain causal scoring, as perplexity and multiple-choice evaluation use it
        torch.testing.assert_close(small(tokens), ref(tokens), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_sequence_decoded_alone_gets_the_logits_its_prompt_would(name):
    """One row's int8 products equal, to the bit, its products in a prompt's panels, and attention is computed per
    token: a sequence run in one call (20 rows: panels) and token by token (one row a call) give every token
    bit-identical logits."""
    _, small, _ = int8_model_and_reference(name, intermediate=128)
    tokens = torch.randint(0, 301, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = small(tokens, small.new_cache(1, 20))
        cache = small.new_cache(1, 20)
        steps = torch.cat([small(tokens[:, t : t + 1], cache) for t in range(20)], 1)
    assert torch.equal(whole, steps)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_prompt_s_int8_products_round_the_inputs_to_int8_as_llama_cpp_s_q8_0(name):
    """A prompt of PANEL_MIN tokens or more takes int8 inputs: the native decoder's logits equal PyTorch's on the
    dequantized weights with each product's input rounded so (with_int8_inputs), except after a value
    that lies on a rounding boundary rounds the other way for the float sums' order (measured: at one position
    in 36, 8e-3 off, and at those after it in its row), and nowhere by more than 5% of the largest logit."""
    # (intermediate 100: the up rows of gate_up start at row 100, inside a group of 8)
    _, small, ref = int8_model_and_reference(name, intermediate=100)
    # short rows: a value rounded the other way changes only the rest of its own row
    tokens = torch.randint(0, 301, (6, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, rounded, unrounded = small(tokens), with_int8_inputs(copy.deepcopy(ref))(tokens), ref(tokens)
    same = (got - rounded).abs().amax(-1) < 1e-4
    assert same.float().mean() >= 2 / 3  # two such rows at most
    assert (got - rounded).abs().max() < 0.05 * rounded.abs().max()
    assert (unrounded - rounded)[same].abs().max() > 100 * (got - rounded)[same].abs().max()  # the rounding counts


def tiny_int8_model(layers: int) -> Llama:
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1)
    return quantize_model(Llama(config).eval(), "int8")


def test_native_decoder_refuses_packed_inputs_and_overfull_caches():
    small = tiny_int8_model(layers=1)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        with pytest.raises(CamelidError, match="plain causal sequences only"):
            small.hidden(tokens, positions=torch.arange(4)[None])
        with pytest.raises(ValueError, match="sequence of 6 tokens does not fit the cache of 5"):
            cache = small.new_cache(1, 5)
            small.hidden(tokens, cache)
            small.hidden(tokens[:, :2], cache)
        assert cache.lengths.tolist() == [4]  # the refused call changed nothing


def test_calls_from_several_threads_give_each_its_own_answer():
    """The serve engine's worker and, say, a scoring thread may call in at once: calls run one at a time."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(500, 128))
    inputs = [torch.randn(4, 128) for _ in range(6)]
    expected = [layer(x) for x in inputs]
    got = [None] * len(inputs)

    def work(i):
        for _ in range(20):
            got[i] = layer(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("layer", ["Int8Linear(torch.randn(64, 32), threads=2)",
                                   "Int4Linear([torch.randn(64, 32)], threads=2)"])
def test_a_forked_child_starts_its_own_threads(layer):
    """After fork the parent's worker threads do not exist in the child (and, asleep, they were still waiters on
    the pool's condition variable): the child's calls must neither wait on them nor on their locks."""
    code = (
        "import os, time, torch\n"
        "from camelid.native import Int4Linear, Int8Linear\n"
        f"layer = {layer}\n"
        "x = torch.randn(2, 32)\n"
        "y = layer(x)\n"
        "time.sleep(0.05)\n"  # the workers stop spinning and sleep
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    same = True\n"
        "    for _ in range(3):\n"
        "        same &= torch.equal(layer(x), y)\n"
        "        time.sleep(0.05)\n"
        "    os._exit(0 if same else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert torch.equal(layer(x), y)\n"  # and the parent goes on with its own
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == 0


def test_a_converted_model_is_refused_not_read_as_garbage():
    small = tiny_int8_model(layers=1)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        before = small(tokens)
        small.half()  # the decoder's own tensors are not the model's parameters: it keeps working
        with pytest.raises(ValueError, match="converted or moved.*load the model again"):
            small(tokens)
        torch.testing.assert_close(small.hidden(tokens), small.native.hidden(tokens))
        assert small.hidden(tokens).dtype == torch.float32 and before.isfinite().all()


def test_torch_single_threaded_is_counted_across_threads():
    """Two decoding loops (two served models) enter and leave in any order: PyTorch gets its setting back."""
    from camelid.native import torch_single_threaded

    model = type("M", (), {"native": object()})()
    own = torch.get_num_threads()
    inside = []
    gates = [threading.Event() for _ in range(3)]

    def first():
        with torch_single_threaded(model):
            gates[0].set()
            gates[1].wait()
            inside.append(torch.get_num_threads())
        gates[2].set()  # leaves while the second is still inside

    def second():
        gates[0].wait()
        with torch_single_threaded(model):
            gates[1].set()
            gates[2].wait()
            inside.append(torch.get_num_threads())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside == [1, 1] and torch.get_num_threads() == own


def test_build_goes_to_the_cache_directory_and_failures_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        native.library()
        built = list((tmp_path / "cache").iterdir())
        assert len(built) == 1 and built[0].name.startswith("native-") and built[0].suffix == ".so"
        native.library.cache_clear()
        monkeypatch.setenv("CC", "env cc")  # a compiler command with arguments, as "ccache gcc"
        native.library()
        assert len(list((tmp_path / "cache").iterdir())) == 2  # another command, another build
        native.library.cache_clear()
        monkeypatch.setenv("CC", "false")  # a compiler that always fails, with a different cache key
        failed = r"^building camelid's kernels \(\S+ path\) with false failed .*--quantize f16$"
        with pytest.raises(CamelidError, match=failed):
            native.library()
        assert len(list((tmp_path / "cache").iterdir())) == 2  # nothing half-written left behind
        native.library.cache_clear()
        monkeypatch.setenv("CC", "no-such-compiler-here")
        with pytest.raises(CamelidError, match="need a C compiler and none was found"):
            native.library()
    finally:
        native.library.cache_clear()


def test_without_a_compiler_int8_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    from camelid.quantize import check_quantization

    with pytest.raises(CamelidError, match="C compiler and none was found"):
        check_quantization("int8")


def test_a_cache_of_another_shape_is_refused_before_the_kernels_touch_it():
    small = tiny_int8_model(layers=2)
    with torch.no_grad():
        for cache in (small.new_cache(2, 8), small.new_cache(1, 8).rows(0, 0)):
            with pytest.raises(ValueError, match="this model's float32 CPU cache for 1 rows"):
                small.hidden(torch.zeros(1, 3, dtype=torch.long), cache)


@pytest.mark.parametrize("bits", [8, 4])
def test_every_instruction_set_path_this_cpu_has_gives_the_same_products(bits):
    """Each path the machine runs (AVX-512 with VNNI, AVX-VNNI, AVX2, plain C) within the kernels' bound of the
    dequantized product (int8 weights in rows of 200: int16 inputs), and the vector paths within float rounding
    of each other (their integer sums are exact; only the order of float additions may differ). int8 weights
    with int8 inputs (rows of 320) give every path the same float steps too: bit-identical, for one row (read
    straight from the weights) and a prompt's (panels; 75 weight rows: a partial group of 8)."""
    from camelid.native import Int4Linear

    g = torch.Generator().manual_seed(bits)
    width = 200 if bits == 8 else 320
    w, x = torch.randn(72, width, generator=g) * 0.05, torch.randn(9, width, generator=g)
    layer = Int8Linear(w) if bits == 8 else Int4Linear([w])
    expected = x @ layer.dequantized().T
    results = {isa: layer.multiply(x, native.library(isa)) for isa in native.available_isas()}
    assert native.chosen_isa() in results and ("generic" in results or results.keys() == {"native"})
    step = x.abs().amax(1, keepdim=True) / 65534 if bits == 8 else x.view(9, -1, 32).abs().amax(-1) / 254
    weights = layer.dequantized().abs()
    bound = (step * weights.sum(1) if bits == 8 else step @ weights.view(72, -1, 32).sum(-1).T) * 1.001 + 1e-5
    for isa, got in results.items():
        assert ((got - expected).abs() <= bound).all(), isa
        torch.testing.assert_close(got, results[native.chosen_isa()], rtol=1e-5, atol=1e-5)
    if bits == 8:
        layer = Int8Linear(torch.randn(75, 320, generator=g) * 0.05)
        for rows in (1, native.PANEL_MIN + 3):
            x = torch.randn(rows, 320, generator=g)
            products = {isa: layer.multiply(x, native.library(isa)) for isa in native.available_isas()}
            for isa, got in products.items():
                assert torch.equal(got, products[native.chosen_isa()]), (isa, rows)


def test_camelid_isa_picks_a_path_and_refuses_one_this_cpu_lacks(monkeypatch):
    monkeypatch.setenv(native.ISA_VARIABLE, native.available_isas()[-1])
    assert native.chosen_isa() == native.available_isas()[-1]
    with pytest.raises(CamelidError, match=r"^'avx1024' is not an instruction-set path this CPU runs"):
        native.library("avx1024")
    monkeypatch.setenv(native.ISA_VARIABLE, "avx1024")
    with pytest.raises(CamelidError, match=r"^CAMELID_ISA=avx1024 is not a path this CPU runs; choose one of: "):
        native.chosen_isa()
