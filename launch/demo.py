"""The tiny CPU pipeline on a real photo: build the model, process an image and a conversation, one
forward pass with loss, save and reload in the released layout, a short greedy generation, then
packed batches of a synthetic pre-training corpus through the data loader and the model.

    python launch/demo.py [model=tiny processor=tiny image=PATH ...]
"""

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step3vl_train.data.config import DataConfig
from step3vl_train.data.loader import PackedLoader
from step3vl_train.data.synthetic import write_corpus
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.counting import count_parameters
from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.images import load_image
from step3vl_train.processing.processor import Step3VLProcessor, collate
from step3vl_train.processing.tokenizer import load_tokenizer


def report(step: str, **values) -> None:
    print(json.dumps({"step": step, **values}), flush=True)


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    config = Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    model = Step3VLForConditionalGeneration(config)
    processor = Step3VLProcessor(load_tokenizer(cfg.tokenizer), ProcessorConfig.from_dict(cfg.processor))
    if processor.image_token_ids.im_patch != config.image_token_id:
        raise ValueError(
            f"tokenizer's <im_patch> is id {processor.image_token_ids.im_patch}, "
            f"the model's image_token_id is {config.image_token_id}"
        )
    report("model", parameters=count_parameters(model))

    image = load_image(cfg.image)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": cfg.question}]}
    assistant = {"role": "assistant", "reasoning_content": cfg.reasoning, "content": cfg.answer}
    sample = processor([user, assistant], [image], sample=cfg.image)
    report(
        "processed",
        image=cfg.image,
        width=image.width,
        height=image.height,
        num_crops=sample.num_patches[0],
        newlines=int(sample.patch_newline_mask.sum()),
        tokens=len(sample.input_ids),
        image_tokens=int((sample.input_ids == config.image_token_id).sum()),
        loss_tokens=int((sample.labels != -100).sum()),
    )

    batch = collate([sample], processor.tokenizer.pad_token_id)
    model.train()
    loss = model(**batch.model_inputs()).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    report("forward_backward", loss=round(loss.item(), 4), grad_norm=round(grad_norm.item(), 4))

    model.eval()
    export_dir = Path(cfg.output_dir) / "model"
    model.save_pretrained(export_dir)
    reloaded = Step3VLForConditionalGeneration.from_pretrained(export_dir)
    with torch.no_grad():
        same = torch.equal(model(**batch.model_inputs(False)).logits, reloaded(**batch.model_inputs(False)).logits)
    report("save_reload", directory=str(export_dir), files=len(list(export_dir.iterdir())), logits_identical=same)

    prompt = processor([user], [image], add_generation_prompt=True, sample=cfg.image)
    inputs = collate([prompt], processor.tokenizer.pad_token_id).model_inputs(with_labels=False)
    output = reloaded.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    # The weights are random until trained, so the text is noise; the point is the cached decode path.
    report("generate", new_tokens=len(new_tokens), text=processor.tokenizer.decode(new_tokens))

    corpus = Path(cfg.output_dir) / "synthetic" / "pretrain"
    write_corpus("pretrain", str(corpus), num=cfg.synthetic_samples, seed=cfg.seed, shard_size=4)
    recipe = OmegaConf.load(Path(__file__).parents[1] / "recipes" / "pretrain.yaml").data
    data_cfg = DataConfig.from_dict(
        OmegaConf.merge(recipe, {"root": str(corpus), "packing": {"seq_len": cfg.packed_seq_len}})
    )
    loader = PackedLoader(data_cfg, processor)
    model.train()
    for index, packed in zip(range(cfg.packed_batches), loader, strict=False):
        loss = model(**packed.batch.model_inputs()).loss
        loss.backward()
        report(
            "packed_batch",
            index=index,
            shape=list(packed.batch.input_ids.shape),
            samples=len(packed.keys[0]),
            images=len(packed.batch.num_patches),
            loss=round(loss.item(), 4),
        )
    stats = loader.stats().summary()
    report(
        "data", **{k: stats[k] for k in ("samples", "tokens", "packing_efficiency", "text_share", "skipped_samples")}
    )


if __name__ == "__main__":
    main()
