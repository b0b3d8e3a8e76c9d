"""The memory plan against hand counts, and loading in the planned dtype and place.

Hand counts use the paper's models (config/paper.yaml: sizes from each hub config.json) on
80 GB GPUs, of which the plan fills 90% = 72e9 bytes. Prompts are planned at 2048 tokens.
"""

import copy
import json

import pytest
import torch
import yaml
from conftest import REPO, TINY

from sd2 import memory, shapes
from sd2.cli import main
from sd2.config import ConfigError, load, validate
from sd2.drafts.layer_prune import layer_prune
from sd2.drafts.prune import prune
from sd2.models import build_model, count_parameters, load_model, load_tokenizer

GB = 10**9
USABLE = 72 * GB
BASE = 8 * GB  # memory.HOST_BASE
L70, L8, L3, L1 = "llama-3.1-70b-instruct", "llama-3.1-8b-instruct", "llama-3.2-3b-instruct", "llama-3.2-1b-instruct"


@pytest.fixture
def paper():
    return load(REPO / "config" / "paper.yaml")


def test_paper_shapes_are_the_published_parameter_counts(paper):
    # Llama-3.2-1B by hand: tied 128256 x 2048 embedding; 16 layers of q, o (2048 x 2048),
    # k, v (2048 x 512: 8 kv heads of 64), gate, up, down (2048 x 8192) and two norms; a final norm.
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert 128256 * 2048 + 16 * layer + 2048 == 1_235_814_400
    published = {L1: 1_235_814_400, L3: 3_212_749_824, L8: 8_030_261_248, L70: 70_553_706_496}
    published["qwen2.5-7b-instruct"] = 7_615_616_512
    for name, count in published.items():
        shape = paper["models"][name]["shape"]
        kind = "qwen2" if name.startswith("qwen") else "llama"
        assert shapes.count_params({**shape, "model_type": kind}) == count, name
        assert shapes.model_shape(name, paper).params == count
        assert memory.load_dtype(name, paper) == "bfloat16"  # dtype auto = what the hub checkpoints store


def test_70b_inference_spreads_over_several_gpus(paper):
    weights = 70_553_706_496 * 2  # bf16
    kv_per_token = 2 * 80 * 8 * 128 * 2  # K and V, 80 layers, 8 kv heads of 128, bf16
    layer_act_per_token = (4 * 8192 + 3 * 28672) * 2
    # target_outputs: 8 prompts of 2048 + 512 new tokens.
    need = weights + kv_per_token * 8 * 2560 + layer_act_per_token * 8 * 2048 + 8 * 128256 * 8
    plan = memory.plan_job("target_outputs", {"target": L70}, paper)
    assert plan.gpu_bytes == need == 151_718_821_888
    assert plan.gpus == 3 and need / USABLE > 2
    assert plan.spread == {"target": True}
    assert plan.host_bytes == BASE  # spread: the weights load straight onto the GPUs
    # self_distill: 64 prompts of 2048 + 1024 new tokens.
    need = weights + kv_per_token * 64 * 3072 + layer_act_per_token * 64 * 2048 + 64 * 128256 * 8
    plan = memory.plan_job("self_distill", {"target": L70}, paper)
    assert plan.gpu_bytes == need == 236_736_102_400 and plan.gpus == 4
    # measure: the target spread, the 1B draft beside it; both score 8 x 2560 positions.
    measure = memory.plan_job("measure", {"target": L70, "draft": L1}, paper)
    assert measure.gpus == 3 and measure.spread == {"target": True, "draft": False}
    assert measure.host_bytes == BASE + 1_235_814_400 * 2


def test_8b_target_fits_one_gpu(paper):
    weights = 8_030_261_248 * 2
    need = weights + 2 * 32 * 8 * 128 * 2 * 8 * 2560 + (4 * 4096 + 3 * 14336) * 2 * 8 * 2048 + 8 * 128256 * 8
    plan = memory.plan_job("target_outputs", {"target": L8}, paper)
    assert plan.gpu_bytes == need == 20_699_242_496
    assert plan.gpus == 1 and plan.spread == {"target": False}
    assert plan.host_bytes == BASE + weights  # loaded on the CPU, then moved
    assert plan.mem_mb == -(-(BASE + weights) // 2**20)


def test_finetune_counts_adamw_masks_checkpointed_activations_and_chunked_logits(paper):
    cfg = copy.deepcopy(paper)
    cfg["finetune"]["batch_size"] = 4  # 4 x 2048 = 8192 tokens per micro-batch
    tokens = 8192
    layer_params = 60_821_504  # one 1B decoder layer (the 1B hand count above)
    need = (
        1_235_814_400 * 16  # fp32 weights 4 + gradients 4 + AdamW moments 8
        + 1_235_814_400 * 2  # bf16 autocast's copies of the weights
        + 16 * layer_params  # a bool mask per decoder weight
        + 16 * tokens * 2048 * 4  # fp32 residual stream at each of the 16 layer boundaries
        + 2 * tokens * (4 * 2048 + 3 * 8192) * 4  # one layer recomputed, with its gradients
        + 2**27 * 4 * 4  # four fp32 chunks of 2^27 logits
    )
    plan = memory.plan_job("finetune", {"draft": L1, "teacher": None}, cfg)
    assert plan.gpu_bytes == need == 28_586_512_384 and plan.gpus == 1
    assert plan.dtypes == {"draft": "float32"}
    # The paper's 3B: steps of 32 x 2048 in micro-batches of 4 x 2048 (8192 tokens): 68 GB, one 80 GB GPU
    # (18 bytes a parameter: 16 for AdamW on fp32 weights, 2 for autocast's bf16 copies).
    need3 = (
        3_212_749_824 * 18 + 28 * 100_669_440 + 28 * 8192 * 3072 * 4 + 2 * 8192 * (4 * 3072 + 3 * 8192) * 4 + 2**27 * 16
    )
    plan3 = memory.plan_job("finetune", {"draft": L3}, paper)
    assert plan3.gpu_bytes == need3 == 68_030_216_192 and plan3.gpus == 1


def test_sparsegpt_prune_holds_one_layer_and_its_hessians(paper):
    b = 2
    embedding = 128256 * 3072  # larger than one 3B layer (100,669,440 parameters)
    hessians = (5 * 3072**2 + (24 * 128) ** 2 + 8192**2) * 4  # q, k, v, gate, up, o read 3072; down 8192
    working = (3072 * 8192 + 8192**2) * 4  # fp32 down_proj and its inverse Hessian
    activations = 2048 * (4 * 3072 + 3 * 8192) * b + 2 * 2048 * 3072 * b
    plan = memory.plan_job("prune", {"draft": L3}, paper)
    assert plan.gpu_bytes == embedding * b + hessians + working + activations == 1_828_192_256
    assert plan.gpus == 1
    # Host: the model twice and every sample's layer inputs and outputs (512 x 2048 x 3072, bf16).
    assert plan.host_bytes == BASE + 2 * 3_212_749_824 * b + 2 * 512 * 2048 * 3072 * b
    magnitude = copy.deepcopy(paper)
    magnitude["prune"]["pruner"] = "magnitude"
    assert memory.plan_job("prune", {"draft": L3}, magnitude).gpus == 0


def test_layer_prune_is_cpu_only(paper):
    plan = memory.plan_job("layer_prune", {"draft": L1}, paper)
    assert plan.gpus == 0 and plan.gpu_bytes == 0
    assert plan.host_bytes == BASE + 1_235_814_400 * 2


def test_a_job_larger_than_a_node_stops_the_dag(paper):
    small = copy.deepcopy(paper)
    small["resources"]["gpu"] = 2
    plan = memory.plan_job("self_distill", {"target": L70}, small)
    with pytest.raises(ConfigError, match=r"resources.gpu: self_distill \(target llama-3.1-70b-instruct\) needs 4"):
        memory.check_fits(plan, small)


def test_dtype_override_changes_the_plan(paper):
    cfg = copy.deepcopy(paper)
    cfg["models"][L8]["dtype"] = "float32"
    plan = memory.plan_job("target_outputs", {"target": L8}, cfg)
    assert plan.dtypes == {"target": "float32"}
    assert plan.host_bytes == BASE + 8_030_261_248 * 4


def test_hub_id_without_shape_fails_only_in_a_gpu_run(paper):
    raw = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    del raw["models"][L1]["shape"]
    with pytest.raises(ConfigError, match=f"models.{L1}.shape: 'meta-llama/Llama-3.2-1B-Instruct' is a hub id"):
        validate(copy.deepcopy(raw))
    raw["resources"]["gpu"] = 0
    assert validate(raw)["resources"]["gpu"] == 0


def test_sizes_of_a_local_checkpoint_and_a_from_scratch_spec(tiny_qwen_dir, byte_tokenizer_dir):
    cfg = validate(yaml.safe_load((REPO / "config" / "test.yaml").read_text()))
    cfg["models"]["local"] = {"hub": str(tiny_qwen_dir)}
    model = load_model(tiny_qwen_dir)
    shape = shapes.model_shape("local", cfg)
    assert shape.params == count_parameters(model) and shape.dtype == "float32"
    spec = cfg["models"]["tiny-draft"]
    tok = load_tokenizer(byte_tokenizer_dir)
    cfg["tokenizers"]["code"]["vocab_size"] = len(tok)
    assert shapes.model_shape("tiny-draft", cfg).params == count_parameters(build_model(spec, tok, 0))


@pytest.fixture
def bf16_dir(tmp_path, byte_tokenizer_dir):
    """A tiny Llama saved in bfloat16, as the hub's Llama and Qwen checkpoints are."""
    tok = load_tokenizer(byte_tokenizer_dir)
    model = build_model({"arch": "llama", **TINY, "num_hidden_layers": 4}, tok, 0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    return tmp_path / "bf16"


def test_dtype_auto_loads_what_the_checkpoint_stores(bf16_dir, tiny_llama_dir):
    assert load_model(bf16_dir).dtype == torch.bfloat16
    assert load_model(tiny_llama_dir).dtype == torch.float32  # trained here, saved in float32
    assert load_model(bf16_dir, dtype="float32").dtype == torch.float32
    assert load_model(tiny_llama_dir, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        load_model(bf16_dir, dtype="bf16")


def test_pruned_checkpoints_keep_the_loaded_dtype(bf16_dir, tmp_path, one_thread):
    layer_prune(bf16_dir, tmp_path / "layers", sparsity=50, dtype="auto")
    assert load_model(tmp_path / "layers").dtype == torch.bfloat16
    assert json.loads((tmp_path / "layers" / "config.json").read_text())["dtype"] == "bfloat16"
    settings = {"pruner": "magnitude", "structure": "unstructured", "calibration_samples": 1, "calibration_seq_len": 8}
    prune(bf16_dir, None, tmp_path / "pruned", sparsity=50, settings=settings, seed=0)
    assert load_model(tmp_path / "pruned").dtype == torch.bfloat16
    prune(bf16_dir, None, tmp_path / "fp32", sparsity=50, settings=settings, seed=0, dtype="float32")
    assert load_model(tmp_path / "fp32").dtype == torch.float32


def test_a_job_planned_with_gpus_stops_at_once_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["self-distill", "--target", "org/big-model", "--prompts", str(tmp_path / "nothing")]
    argv += ["--settings", "{}", "--out", str(tmp_path / "out"), "--gpus", "2"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value)
    assert "sd2 self-distill" in message and "org/big-model" in message
    assert "planned with 2 GPU(s)" in message and "torch.cuda.is_available() is False" in message
    assert not (tmp_path / "out").exists()


def test_too_few_visible_gpus_also_stop_the_job(monkeypatch):
    from sd2.models import require_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="planned with 3 GPU.* 1 GPU.s. are visible"):
        require_cuda(3, "sd2 measure (target)")
    require_cuda(1, "sd2 measure (target)")
    require_cuda(0, "a CPU job")  # nothing planned, nothing checked


def test_memory_plan_command_prints_every_rule(capsys):
    main(["memory-plan", "--config", str(REPO / "config" / "paper.yaml")])
    out = capsys.readouterr().out
    for rule in ("self_distill", "target_outputs", "prune", "layer_prune", "finetune", "measure"):
        assert rule in out
    assert "target=llama-3.1-70b-instruct" in out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt_neox"])
@pytest.mark.parametrize("tied", [False, True])
def test_count_params_matches_the_built_model(kind, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    if kind != "gpt_neox":
        sizes["num_key_value_heads"] = 2
    config = AutoConfig.for_model(kind, tie_word_embeddings=tied, **sizes)
    model = AutoModelForCausalLM.from_config(config)
    assert shapes.count_params({**config.to_dict(), "model_type": kind}) == count_parameters(model)


def test_vllm_engine_asks_for_the_gpus_its_preallocated_share_needs(paper):
    paper = copy.deepcopy(paper)
    paper["engine"]["name"] = "vllm"  # gpu_memory_utilization 0.9: 72e9 bytes of each 80 GB GPU
    weights = 70_553_706_496 * 2  # bf16
    one_sequence = 2 * 80 * 8 * 128 * 2 * (2048 + 1024)  # K and V of one longest self-distill sequence
    assert weights + one_sequence == 142_114_045_952  # > 72e9, <= 2 x 72e9: 2 GPUs (64 heads split in two)
    plan = memory.plan_job("self_distill", {"target": L70}, paper)
    assert (plan.gpus, plan.gpu_bytes) == (2, 2 * USABLE)
    assert plan.parts == {"weights": weights, "kv_cache": 2 * USABLE - weights}
    assert plan.spread == {"target": False} and plan.host_bytes == 2 * BASE  # one worker process per GPU
    # The 8B: one GPU, its KV cache the 72e9 - 16.06e9 bytes beyond the weights.
    plan = memory.plan_job("self_distill", {"target": L8}, paper)
    assert (plan.gpus, plan.parts["kv_cache"]) == (1, USABLE - 8_030_261_248 * 2)
    # target_outputs first times the 70B alone on transformers (batch 1: 141e9 bytes of weights, spread over 2).
    plan = memory.plan_job("target_outputs", {"target": L70}, paper)
    assert plan.gpus == 2 and plan.spread == {"target": True}
    paper["engine"]["gpu_memory_utilization"] = 0.5  # 40e9 a GPU: 4 GPUs (64 heads split in four)
    assert memory.plan_job("self_distill", {"target": L70}, paper).gpus == 4
    # Room for one sequence of the 70B's whole 131,072-token context: 42.9e9 bytes of KV cache beside the weights.
    paper["engine"].update(gpu_memory_utilization=0.9, max_model_len=131072)
    assert 2 * 80 * 8 * 128 * 2 * 131072 == 42_949_672_960  # (141.1e9 + 42.9e9) / 72e9 = 2.6: 4 GPUs (64 heads)
    assert memory.plan_job("self_distill", {"target": L70}, paper).gpus == 4


def test_a_parallel_draft_is_planned_over_its_mask_chains(paper):
    """pard fine-tuning: a 2048-token row and its kept mask chains (k 8, keep 0.7, keep_min 0.2) are 6,910 slots."""
    cfg = copy.deepcopy(paper)
    cfg["finetune"]["batch_size"] = 4
    row = 2048 + 1434 + 1004 + 702 + 492 + 410 + 410 + 410  # 2048 x max(0.7^j, 0.2), j = 1..7, rounded
    tokens = 4 * row
    need = (
        1_235_814_400 * 18  # AdamW on fp32 weights, autocast's bf16 copies
        + 16 * 60_821_504  # masks
        + 16 * tokens * 2048 * 4  # residual stream at the layer boundaries, over every slot
        + 2 * tokens * (4 * 2048 + 3 * 8192) * 4  # one layer recomputed
        + 2**27 * 16  # logits in chunks
        + 4 * row * row * 4  # each row's additive attention mask
    )
    plan = memory.plan_job("finetune", {"draft": L1}, cfg, parallel=True)
    assert plan.gpu_bytes == need and plan.gpus == 1
    plain = memory.plan_job("finetune", {"draft": L1}, cfg)
    assert plan.parts["activations"] > 3 * plain.parts["activations"]
    # Measuring scores 2048 prompt tokens and 128 new ones with 7 masks each: 3072 slots per row.
    m = cfg["measure"]
    parallel = memory.plan_job("measure", {"target": L8, "draft": L1}, cfg, parallel=True)
    assert (
        parallel.parts["draft_attention_mask"] == m["batch_size"] * (2048 + m["max_new_tokens"] * m["k_max"]) ** 2 * 2
    )
    with pytest.raises(ValueError, match="rule 'prune' has no parallel-draft plan"):
        memory.plan_job("prune", {"draft": L1}, cfg, parallel=True)
