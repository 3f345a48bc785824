"""MM1.5-style multimodal model for transformers (trust_remote_code=True), written by `mm15 export-hf`.

    model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)
    logits = model(input_ids=ids, pixel_values=preprocess_tiles(tiles_uint8)).logits
    new = model.generate(input_ids=ids, pixel_values=preprocess_tiles(tiles_uint8), max_new_tokens=32)

A CLIP vision tower (hidden state `feature_layer`, class token dropped), the C-Abstractor connector (Honeybee: RegStage
of timm Bottlenecks with LayerNorm2d and SiLU, adaptive average pooling, RegStage, a two-layer readout) and a
transformers causal LM built from `text_config` (Llama, Qwen2, Mixtral or Qwen2-MoE; transformers fuses the MoE
checkpoints' per-expert tensors as it loads them, under `language_model.` too). `input_ids` hold `image_token_id`
placeholders, `tokens_per_tile` per tile; `pixel_values` [N, 3, S, S] are the prompt's tiles in placeholder order (as
mm15's image splitting makes them, CLIP-normalised by `preprocess_tiles`). This file depends on torch and transformers
only.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig
from transformers import GenerationMixin, PreTrainedModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_tiles(tiles_uint8: torch.Tensor) -> torch.Tensor:
  """uint8 tiles [N, S, S, 3] -> CLIP-normalised float32 [N, 3, S, S]."""
  x = tiles_uint8.to(torch.float32) / 255.0
  x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
  return x.permute(0, 3, 1, 2).contiguous()


class Mm15Config(PretrainedConfig):
  model_type = "mm15"
  sub_configs = {"vision_config": CLIPVisionConfig, "text_config": AutoConfig}

  def __init__(self, vision_config=None, text_config=None, connector_hidden=1024, connector_depth=3, pooled_side=12,
               se_ratio=0.25, feature_layer=-1, image_token_id=0, center_tokens=False, **kwargs):
    if isinstance(vision_config, dict):
      vision_config = CLIPVisionConfig(**vision_config)
    if isinstance(text_config, dict):
      text_config = AutoConfig.for_model(**text_config)
    self.vision_config, self.text_config = vision_config, text_config
    self.connector_hidden, self.connector_depth, self.pooled_side = connector_hidden, connector_depth, pooled_side
    self.se_ratio, self.feature_layer, self.image_token_id = se_ratio, feature_layer, image_token_id
    self.center_tokens = center_tokens  # subtract each tile's mean output token (ConnectorConfig.center_tokens)
    super().__init__(**kwargs)

  @property
  def tokens_per_tile(self) -> int:
    return self.pooled_side ** 2


class LayerNorm2d(nn.LayerNorm):
  """LayerNorm over the channels of an NCHW tensor."""

  def forward(self, x):
    x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
    return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Module):
  def __init__(self, in_chs, out_chs, kernel_size, groups=1, apply_act=True):
    super().__init__()
    self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
    self.bn = LayerNorm2d(out_chs, eps=1e-6)
    self.act = nn.SiLU() if apply_act else nn.Identity()

  def forward(self, x):
    return self.act(self.bn(self.conv(x)))


class SEModule(nn.Module):
  def __init__(self, channels, rd_channels):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
    self.act = nn.SiLU()
    self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

  def forward(self, x):
    s = x.mean((2, 3), keepdim=True)
    return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class Bottleneck(nn.Module):
  def __init__(self, in_chs, out_chs, se_ratio):
    super().__init__()
    self.conv1 = ConvNormAct(in_chs, out_chs, 1)
    self.conv2 = ConvNormAct(out_chs, out_chs, 3, groups=out_chs)
    se_channels = int(round(in_chs * se_ratio))
    self.se = SEModule(out_chs, se_channels) if se_channels else nn.Identity()
    self.conv3 = ConvNormAct(out_chs, out_chs, 1, apply_act=False)
    self.downsample = ConvNormAct(in_chs, out_chs, 1, apply_act=False) if in_chs != out_chs else nn.Identity()
    self.act3 = nn.SiLU()

  def forward(self, x):
    return self.act3(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.downsample(x))


class RegStage(nn.Module):
  def __init__(self, depth, in_chs, out_chs, se_ratio):
    super().__init__()
    self.blocks = nn.Sequential(*[Bottleneck(in_chs if i == 0 else out_chs, out_chs, se_ratio) for i in range(depth)])

  def forward(self, x):
    return self.blocks(x)


class CAbstractor(nn.Module):
  def __init__(self, config: Mm15Config):
    super().__init__()
    v, hidden = config.vision_config, config.connector_hidden
    grid_side = v.image_size // v.patch_size
    self.pos_emb = nn.Parameter(torch.zeros(1, grid_side * grid_side, v.hidden_size))
    self.net = nn.Sequential(RegStage(config.connector_depth, v.hidden_size, hidden, config.se_ratio),
                             nn.AdaptiveAvgPool2d((config.pooled_side, config.pooled_side)),
                             RegStage(config.connector_depth, hidden, hidden, config.se_ratio))
    d = config.text_config.hidden_size
    self.readout = nn.Sequential(nn.Linear(hidden, d), nn.SiLU(), nn.Linear(d, d))
    self.center_tokens = config.center_tokens

  def forward(self, x_NLD):
    x = x_NLD + self.pos_emb
    n, length, d = x.shape
    side = int(round(length ** 0.5))
    x = self.net(x.transpose(1, 2).reshape(n, d, side, side))
    x = self.readout(x.flatten(2).transpose(1, 2))  # [N, pooled_side ** 2, d_model]
    return x - x.mean(dim=1, keepdim=True) if self.center_tokens else x


class Mm15ForConditionalGeneration(PreTrainedModel, GenerationMixin):
  config_class = Mm15Config
  base_model_prefix = "mm15"
  _supports_attention_backend = True

  def __init__(self, config: Mm15Config):
    super().__init__(config)
    self.vision_tower = CLIPVisionModel(config.vision_config)
    self.connector = CAbstractor(config)
    self.language_model = AutoModelForCausalLM.from_config(config.text_config)
    self.post_init()

  def get_input_embeddings(self):
    return self.language_model.get_input_embeddings()

  def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] -> [N, tokens_per_tile, d_model]."""
    hidden = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return self.connector(hidden[self.config.feature_layer][:, 1:])

  def forward(self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None, **kwargs):
    if inputs_embeds is None:
      inputs_embeds = self.get_input_embeddings()(input_ids)
      if pixel_values is not None and bool((input_ids == self.config.image_token_id).any()):  # not in decode steps
        image = self.encode_tiles(pixel_values.to(inputs_embeds.dtype))
        slots = (input_ids == self.config.image_token_id)[..., None]
        if int(slots.sum()) != image.shape[0] * image.shape[1]:
          raise ValueError(f"input_ids hold {int(slots.sum())} image placeholders, pixel_values give "
                           f"{image.shape[0]} tiles of {image.shape[1]} tokens")
        inputs_embeds = inputs_embeds.masked_scatter(slots, image.reshape(-1, image.shape[-1]))
    return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
