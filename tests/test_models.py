import pytest
import torch

from training.data.models import ModelLoadError, load_model, resolve_blocks


def test_tiny_llama_loads_with_blocks(tiny_model):
    assert tiny_model.n_layers == 4
    assert tiny_model.d_model == 64
    assert tiny_model.bos_id == 1
    ids = tiny_model.tokenizer("hello", add_special_tokens=False).input_ids
    assert ids == [4 + ord(c) - 32 for c in "hello"]


def test_layer_out_of_range_names_the_model(tiny_model):
    with pytest.raises(ModelLoadError, match="out of range.*4 decoder blocks"):
        tiny_model.check_layer(4)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        load_model("no-such-model", data_dir=tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), data_dir=tmp_path)


def test_unresolvable_blocks_are_named():
    with pytest.raises(ModelLoadError, match="cannot find the decoder blocks of mystery"):
        resolve_blocks(torch.nn.Linear(2, 2), "mystery")


@pytest.mark.slow
def test_embedded_model_is_converted_once_and_chats(embedded_model, data_dir):
    assert (data_dir / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert embedded_model.n_layers == 30 and embedded_model.d_model == 576
    tok = embedded_model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = embedded_model.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
