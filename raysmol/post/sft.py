"""SFT: packed conversations, loss on the assistant's tokens only (raysmol/post/chat.py), next-token
cross-entropy on the shared loop."""

from __future__ import annotations

from raysmol.config import Config
from raysmol.post.base import PostTask
from raysmol.post.chat import ChatBatches, prepare_chat
from raysmol.train.hooks import Context
from raysmol.train.objectives import Objective, causal_lm


class SFT(PostTask):
    verb = "sft"
    group = 1  # rows per item: one packed row

    def prepare_data(self, cfg: Config) -> None:
        s = cfg.sft
        data = prepare_chat(s.data, self.tokenizer, cfg.train.seq_len, s.val_fraction, s.messages_key)
        self.rows, self.stats = {"train": data["train"], "val": data["val"]}, data["stats"]
        self.extras: dict = {"train": {}, "val": {}}

    def objective(self, cfg: Config) -> Objective:
        return causal_lm

    def batches(self, ctx: Context) -> tuple[ChatBatches, ChatBatches | None]:
        n, seed = ctx.cfg.train.samples_per_step(), ctx.cfg.data.seed
        train = ChatBatches(self.rows["train"], n, seed, self.group, self.extras["train"], self.verb)
        val = self.rows["val"]
        return train, (ChatBatches(val, n, seed + 1, self.group, self.extras["val"], self.verb) if val else None)
