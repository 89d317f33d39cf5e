"""Helpers for tests and benchmarks: random reward adapters on the embedded world, and tiny randomly
initialised models of the real classes (Stable Diffusion 1.5, XL and 3.5, FLUX.1, FLUX.2, Qwen-Image, CLIP, BLIP), built
offline from configs."""

from __future__ import annotations

from pathlib import Path

import torch

from msdda.adapters import AdapterMetadata, save_adapter, weights_hash

__all__ = ["random_world_adapter", "tiny_clip", "tiny_blip", "tiny_stable_diffusion", "tiny_stable_diffusion_3",
           "tiny_flux", "tiny_flux2", "tiny_qwen_image", "byte_vocabulary", "character_t5_tokenizer",
           "qwen_tokenizer", "mistral_tokenizer"]

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_world_adapter(folder: str | Path, seed: int, beta: float = 0.01, num_inference_steps: int = 4,
                         scale: float = 0.3, rank: int = 2, base: str | Path | None = None) -> Path:
    """A LoRA with random non-zero weights and true metadata, as the trainer writes it.

    ``base`` is a local pipeline folder (default: the shipped world); its scheduler class is kept.
    """
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from msdda.world import world_path

    pipeline = StableDiffusionPipeline.from_pretrained(base or world_path(), local_files_only=True)
    unet = pipeline.unet
    base_hash = weights_hash(unet)
    generator = torch.Generator().manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    scheduler = pipeline.scheduler
    if type(scheduler).__name__ not in ("DDIMScheduler", "DDPMScheduler"):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config)
    metadata = AdapterMetadata(
        reward_name=f"random-{seed}", reward_version="1", beta=beta, step_reward="tweedie",
        base_model=str(base or "world"), base_model_hash=base_hash, scheduler_class=type(scheduler).__name__,
        scheduler_config=dict(scheduler.config),
        num_inference_steps=num_inference_steps, eta=1.0, guidance_scale=3.0, lora_rank=rank,
        lora_alpha=float(rank), lora_target_modules=list(TARGETS), training={"note": "random weights"})
    return save_adapter(folder, unet, metadata)


def byte_characters() -> dict[int, str]:
    """Byte-level BPE's stand-in character for each byte (GPT-2's table): the printable bytes stand for themselves,
    the others for the characters from U+0100 on, in the table's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + len(table) - len(printable))
    return table


def byte_vocabulary() -> dict[str, int]:
    """A CLIP tokenizer vocabulary with no merges: the 256 byte stand-ins of byte-level BPE (GPT-2's table),
    alone and word-final, plus CLIP's two special tokens. Every text tokenizes, one byte per token."""
    characters = list(byte_characters().values())
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in characters + [c + "</w>" for c in characters]:
        vocabulary[token] = len(vocabulary)
    return vocabulary


def _tiny_clip_text_config(vocabulary_size: int) -> dict:
    return dict(vocab_size=vocabulary_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A CLIPModel (32-wide, 2 layers, 32 px images, 16-d projections) with tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    vocabulary = byte_vocabulary()
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=_tiny_clip_text_config(len(vocabulary)),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_blip(folder: str | Path, seed: int = 1) -> Path:
    """A BlipForImageTextRetrieval (ImageReward's layout) with a word-level BERT tokenizer holding [ENC]."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    folder = Path(folder)
    words = ["a", "red", "blue", "circle", "square", "on", "the", "left", "at", "top", "photo", "of", "cat"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENC]"]
    BertTokenizer(vocab={token: index for index, token in enumerate(specials + words)}).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(vocab_size=len(specials + words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    return folder


def tiny_stable_diffusion(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A StableDiffusionPipeline of SD 1.5's classes and schedule at toy size (8x8 latents, 16 px images).

    ``prediction_type="v_prediction"`` gives the SD 2.x flavour.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    vocabulary = byte_vocabulary()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=16, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_clip_text_config(len(vocabulary))))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder,
                                       tokenizer=CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


def tiny_stable_diffusion_xl(folder: str | Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline of SDXL's classes and schedule at toy size (8x8 latents, 16 px images): a UNet with
    SDXL's added text-and-time embedding (the pooled projection of the second text encoder and six time ids), a CLIP
    text encoder and a CLIP text encoder with projection whose penultimate states are joined into the cross-attention
    width, as SDXL joins 768 + 1280 into 2048."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    vocabulary = byte_vocabulary()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**_tiny_clip_text_config(len(vocabulary)), projection_dim=32)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=16, sample_size=16, scaling_factor=0.13025)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    tokenizer = CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77)
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config),
                                         text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipeline.save_pretrained(folder)
    return folder


def character_t5_tokenizer():
    """A T5 tokenizer (T5's Unigram model and special tokens) whose pieces are the printable ASCII characters, each
    alone and word-initial, so that every English text tokenizes without a SentencePiece file or the Hub."""
    from transformers import T5Tokenizer

    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -1.0) for c in characters] + [(c, -1.5) for c in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _tiny_flow_vae(shift_factor: float, scaling_factor: float):
    """The tiny SD pipeline's VAE (16 px images, 8x8x4 latents) in the SD3/FLUX layout: no quant convolutions, the
    latents shifted as well as scaled (by the real model's factors, which the pipelines' decoding reads)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                         norm_num_groups=16, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=shift_factor, scaling_factor=scaling_factor)


def tiny_stable_diffusion_3(folder: str | Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline of SD 3.5's classes at toy size (8x8 latents, 16 px images): an MMDiT with SD 3.5's
    dual attention and RMS q/k norms in its first block, two CLIP text encoders with projections and a T5 encoder
    (their widths padded into the joint attention width as SD3 pads 2 x 768 + 1280 into 4096), a VAE with SD3's
    latent shift and scale, and SD 3.5's FlowMatchEulerDiscreteScheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    vocabulary = byte_vocabulary()
    tokenizer_3 = character_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    clip_config = CLIPTextConfig(**_tiny_clip_text_config(len(vocabulary)), projection_dim=32)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip_config), CLIPTextModelWithProjection(clip_config)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_ff=37, d_kv=16, num_layers=1,
                                             num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = _tiny_flow_vae(shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    def clip_tokenizer():
        return CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77)

    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(), text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)
    pipeline.save_pretrained(folder)
    return folder


def tiny_flux(folder: str | Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """A FluxPipeline of FLUX.1's classes and scheduler at toy size (16 px images are 8x8 latents, 16 patches): a
    transformer with one double-stream and one single-stream block, rotary axes splitting its head width as FLUX's do,
    and FLUX.1-dev's guidance embedding (``guidance_embeds=False``: FLUX.1-schnell's layout); a CLIP text encoder for
    the pooled output and a T5 encoder for the sequence, wider than the pooled output as FLUX's are (4096 > 768); a
    VAE with FLUX's latent shift and scale; FLUX.1-dev's FlowMatchEulerDiscreteScheduler (the dynamic shift, mu from
    the image's sequence length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    vocabulary = byte_vocabulary()
    tokenizer_2 = character_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_clip_text_config(len(vocabulary))))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=64, d_ff=37, d_kv=16, num_layers=1,
                                             num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = _tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                            tokenizer=CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77),
                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipeline.save_pretrained(folder)
    return folder


def _byte_level_bpe(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, merges) of a byte-level BPE whose tokens are the 256 byte stand-ins and every prefix of each of
    ``words``, so that each word (with its leading space, as the pre-tokenizer splits it) is one token and every other
    text one token per byte."""
    table = byte_characters()
    vocabulary = {character: index for index, character in enumerate(table.values())}
    merges = []
    for word in words:
        characters = "".join(table[byte] for byte in word.encode())
        for end in range(2, len(characters) + 1):
            if characters[:end] not in vocabulary:
                merges.append((characters[:end - 1], characters[end - 1]))
                vocabulary[characters[:end]] = len(vocabulary)
    return vocabulary, merges


QWEN_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color",
                       " shape", " size", " texture", " quantity", " text", " spatial", " relationships", " of",
                       " objects", " and", " background")
"""The words of QwenImagePipeline's prompt template, each one token of :func:`qwen_tokenizer`."""


def qwen_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE, Qwen's chat special tokens) whose merges make each word of
    QwenImagePipeline's prompt template one token, so that the template's system part is 34 tokens, as with Qwen's
    own tokenizer, and the pipeline drops exactly it; other text tokenizes one byte per token. Built offline: Qwen's
    151k-token vocabulary is not needed for a random text encoder."""
    from transformers import Qwen2Tokenizer

    vocabulary, merges = _byte_level_bpe(QWEN_TEMPLATE_WORDS)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocabulary[special] = len(vocabulary)
    tokenizer = Qwen2Tokenizer(vocab=vocabulary, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwen_image(folder: str | Path, seed: int = 0) -> Path:
    """A QwenImagePipeline of Qwen-Image's classes and scheduler at toy size (32 px images are 8x8 latents, 16
    patches): a transformer of two blocks with rotary axes splitting its head width as Qwen-Image's do; a Qwen2.5-VL
    text encoder (its language model 32 wide, two layers, a one-block vision tower it does not use for text) with
    :func:`qwen_tokenizer`; Qwen-Image's causal 3-D VAE (one frame, 4x downsampling where Qwen-Image's is 8x,
    per-channel latent mean and std); Qwen-Image's FlowMatchEulerDiscreteScheduler (the exponential dynamic shift with
    a terminal sigma)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]},
                       bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tokenizer.pad_token_id)
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=2,
                         spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0])
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text_config,
                                                                        vision_config=vision_config))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, -0.4],
                                 latents_std=[1.5, 2.0, 2.5, 3.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                              axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                time_shift_type="exponential", use_dynamic_shifting=True)
    pipeline = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 transformer=transformer)
    pipeline.save_pretrained(folder)
    return folder


MISTRAL_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
                         "[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}"
                         "[INST]{{ message['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}")
"""Mistral Small 3's chat layout for the text-only messages Flux2Pipeline formats (system, then user)."""


def mistral_tokenizer():
    """A byte-level BPE tokenizer with Mistral Small 3's special tokens and chat layout, whose merges make each word of
    Flux2Pipeline's system message one token (the message is 30 tokens; other text one token per byte), padding on
    the right to ``max_length`` as the pipeline asks. FLUX.2 ships a PixtralProcessor (Mistral's 131k-token tekken
    vocabulary and an image processor); Flux2Pipeline's text-to-image path calls only its ``apply_chat_template``,
    which this tokenizer has, built offline."""
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary, merges = _byte_level_bpe(sorted(set(re.findall(r" ?[A-Za-z]+", SYSTEM_MESSAGE))))
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    for special in specials:
        vocabulary[special] = len(vocabulary)
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:],
                                  chat_template=MISTRAL_CHAT_TEMPLATE)


def tiny_flux2(folder: str | Path, seed: int = 0) -> Path:
    """A Flux2Pipeline of FLUX.2 [dev]'s classes at toy size (16 px images are 8x8 VAE latents, 4x4 patchified ones,
    16 tokens): a transformer with one double-stream and one single-stream block, four rotary axes and the guidance
    embedding; a Mistral 3 text encoder whose language model has the 30 layers Flux2Pipeline reads (layers 10, 20 and
    30, 16 wide each, joined into 48) and a one-block Pixtral vision tower, with :func:`mistral_tokenizer`; FLUX.2's
    VAE (its latents' batch-norm statistics set to non-trivial values); a FlowMatchEulerDiscreteScheduler with the
    dynamic shift."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    folder = Path(folder)
    tokenizer = mistral_tokenizer()
    torch.manual_seed(seed)
    text_config = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                       num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision_config = dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text_config,
                                                                    vision_config=vision_config,
                                                                    spatial_merge_size=1))
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                             sample_size=16)
    with torch.no_grad():
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipeline = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipeline.save_pretrained(folder)
    return folder
