"""Small, real Hugging Face fast tokenizers that behave like the three supported families.

No hub downloads work on the CPU machines, yet tests and the CPU quickstart need tokenizers whose
*interface-level* behaviour matches Qwen2.5, Llama-3.x and Gemma-3: special tokens, whether
``encode`` adds a BOS, the chat template (and that it renders the BOS exactly once), the marker
search over U+3200–U+33FF, and ``<concept>``/``</concept>`` splitting so the marker has distinct
left/right neighbours. ``build_toy_tokenizer(family)`` returns a ``PreTrainedTokenizerFast``;
``save_toy_tokenizer(family, directory)`` writes it so ``AutoTokenizer.from_pretrained`` loads it.

Design decisions and trade-offs:

- **Byte-level BPE trained in-process** on the small English corpus embedded below (the
  ``tokenizers`` trainer is deterministic for a fixed corpus and takes a few milliseconds), with
  the Llama-3/Qwen2 pre-tokenizer regex. Gemma-3's real tokenizer is a SentencePiece-style BPE
  with byte fallback; the toy uses byte-level BPE for all three because only the interface
  behaviour matters here, not the segmentation of ordinary text.
- **Marker code points are added as explicit merges** after training (a merge of the first two
  UTF-8 bytes, then one per marker char), appended at the lowest priority. This makes a chosen
  handful of U+3200–U+33FF chars single tokens, with a different *first* one per family (the same
  first marker as the real tokenizer: U+320E Qwen, U+33A1 Llama, U+321C Gemma), while earlier code
  points in the range still encode to two or three tokens, so the marker search is exercised.
- **Every toy tokenizer has exactly** ``VOCAB_SIZE`` **ids** (BPE vocab + marker merges + the
  family's special tokens, padded with family-style reserved tokens), so a tiny model built with
  ``vocab_size=VOCAB_SIZE`` covers all three families.
- Special-token placement follows the real files: Gemma's ``<pad>``/``<eos>``/``<bos>``/``<unk>``
  are ids 0–3 (pad id 0 is a classic trap), Qwen and Llama specials come after the BPE vocab.
  Like the real Llama-3, the llama toy has **no pad token** (``<|finetune_right_pad_id|>`` exists
  but is not set as pad); consumers must choose one.
- Chat templates are simplified (no tools) but render the same strings as the real ones for
  system/user/assistant messages, including Qwen2.5's default system prompt and Llama-3.3's
  knowledge-cutoff system header.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("qwen2", "llama", "gemma3")

# Total number of ids of every toy tokenizer (len(tokenizer)); use it as a tiny model's vocab_size.
VOCAB_SIZE = 1536

# Llama-3's split regex (Qwen2 and the toy Gemma use single digits instead of runs of 1-3).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

_QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_GEMMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Per family: BPE training size (byte alphabet + merges + leading specials; it differs per family
# so the marker ids differ too), split regex, specials before/after the BPE vocab, the name pattern
# of the reserved tokens that pad to VOCAB_SIZE, the HF special-token roles, the chat template and
# the marker chars made single tokens (the first one is what select_marker must find).
_FAMILY_SPECS: dict[str, dict] = {
    "qwen2": {
        "bpe_size": 1400,
        "split": _QWEN2_SPLIT,
        "leading": [],
        "trailing": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "reserved": "<|extra_{}|>",
        "roles": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": _QWEN2_TEMPLATE,
        "markers": [0x320E, 0x321C, 0x3231, 0x33A1],
    },
    "llama": {
        "bpe_size": 1380,
        "split": _LLAMA3_SPLIT,
        "leading": [],
        "trailing": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
            "<|finetune_right_pad_id|>",
        ],
        "reserved": "<|reserved_special_token_{}|>",
        "roles": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": _LLAMA3_TEMPLATE,
        "markers": [0x33A1, 0x33C4, 0x33D1],
    },
    "gemma3": {
        "bpe_size": 1420,
        "split": _QWEN2_SPLIT,
        "leading": ["<pad>", "<eos>", "<bos>", "<unk>"],
        "trailing": ["<start_of_turn>", "<end_of_turn>"],
        "reserved": "<unused{}>",
        "roles": {
            "bos_token": "<bos>",
            "eos_token": "<end_of_turn>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        },
        "template": _GEMMA3_TEMPLATE,
        "markers": [0x321C, 0x3231, 0x33A1, 0x33C4],
    },
}

# The training corpus: fixed English prose, including the words of the NLA prompts so they
# tokenise compactly, as they would with a real tokenizer. Changing it changes every toy id.
_CORPUS = """\
You are a meticulous AI researcher conducting an important investigation into activation vectors from a language model.
Your overall task is to describe the semantic content of that activation vector.
We will pass the vector enclosed in <concept> tags into your context.
You must then produce an explanation for the vector, enclosed within <explanation> tags.
The explanation consists of 2-3 text snippets describing that vector. Here is the vector. Please provide an explanation.
Summary of the following text: <text>the cat sat on the mat</text> <summary>
Summary of the following text: <text>a list of three items where only two are given</text> <summary>
<explanation>
The text is a recipe; the final token opens a list of ingredients.
</explanation>
<explanation>
Formal academic tone; the sentence is building toward a definition of a technical term.
</explanation>
Which clues tell a reader how a sentence will continue? Brackets that were opened and not yet closed.
A list that announced four points and has only given three of them so far.
A steady, formal voice that the writer keeps from the first paragraph to the last.
An argument that has made its claim and now owes the reader some evidence.
The layout of a doctor's notes, a legal contract, a poem or a news report.
A phrase that comes back again and again with small changes each time.
The final feature must describe the very end of the sequence, its role, and what may follow.
The weather this morning was cold and grey, but by noon the sun had broken through the clouds.
She walked along the river, counting the boats that drifted past the old stone bridge.
In the small village, the baker opened his shop before dawn, and the smell of fresh bread filled the street.
The committee will meet on Tuesday to discuss the budget for the next financial year.
Researchers measured the temperature of the water every hour for three weeks.
The results suggest that the effect is stronger in younger participants than in older ones.
He opened the letter slowly, afraid of what it might say, and read it twice before he spoke.
The train to the city leaves at seven o'clock, and the journey takes about two hours.
Add the flour, sugar and butter to a large bowl, then mix until the dough is smooth.
Bake the bread in a hot oven for forty minutes, or until the crust is golden brown.
The history of the region is long and complicated, shaped by trade, war and migration.
In 1848, revolutions spread across Europe as people demanded new rights and freedoms.
The museum's collection includes paintings, sculptures, coins and ancient manuscripts.
Our team is building a new product that helps small businesses manage their accounts.
Please send me the report by Friday so that I can review it over the weekend.
The children played in the garden while their parents prepared dinner in the kitchen.
A good night's sleep improves memory, mood and the ability to concentrate during the day.
The doctor asked the patient to describe the pain and how long it had lasted.
The company reported higher profits this quarter, driven by strong sales in Asia.
Climate change is expected to increase the frequency of floods, droughts and heat waves.
The engine failed shortly after takeoff, and the pilot returned safely to the airport.
Mathematics is the study of numbers, shapes, patterns and the relations between them.
The function returns a list of values, one for each element of the input array.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
if value is None:
    raise ValueError("value must not be None")
import numpy as np
x = np.zeros((3, 4), dtype=np.float32)
The server responded with an error, so the client retried the request after a short delay.
Each layer of the network transforms the hidden state and passes it to the next layer.
The residual stream carries information from early layers to late layers of the transformer.
An activation vector is a list of numbers that describes the internal state of the model at one token.
The autoencoder maps the vector to words and the words back to a vector, and we compare the two.
The reconstruction error is small when the explanation captures what the vector represents.
Training uses a learning rate of two times ten to the minus five and a batch of two hundred and fifty six.
The policy samples several explanations for each vector, and a reward compares each one with the original.
The user asked a question about the history of the printing press and its effect on literacy.
The assistant answered politely, giving three reasons and a short summary at the end.
In the story, the young girl finds a map hidden inside an old book in her grandmother's attic.
The map leads to a forest where, according to legend, a treasure was buried long ago.
Questions about privacy, safety and fairness are central to the design of modern software.
The government announced new rules for banks, requiring them to hold more capital.
Prices rose by three percent last year, while wages increased by only two percent.
The football match ended in a draw after both teams scored twice in the second half.
The concert was held in a large hall, and the orchestra played music by several composers.
Students should read the chapter carefully and answer the questions at the end of each section.
The first step is to collect the data; the second is to clean it; the third is to analyse it.
Water boils at one hundred degrees at sea level, but at a lower temperature in the mountains.
The cat jumped onto the table, knocked over a glass of milk, and ran out of the room.
They travelled north for many days, crossing rivers, hills and wide empty plains.
The city council approved a plan to build new houses, schools and parks near the station.
Good writing is clear, simple and direct; it says what it means and nothing more.
The article argues that public transport should be cheaper and more reliable.
Scientists discovered a new species of frog in the rain forest, living high in the trees.
The meeting was postponed because several members were ill or travelling abroad.
A careful reader notices the small details that reveal the character of a person.
The lecture explained how light behaves both as a wave and as a particle.
Her novel tells the story of three sisters who inherit a farm and must decide what to do with it.
The software update fixes several bugs and improves the performance of the search feature.
Numbers like 12, 345, 6789 and 3.14159 appear in tables, prices, dates and measurements.
On 4 July 2024 the store opened at 9:30 and closed at 17:00, selling 250 books.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
Why is the sky blue? Sunlight is scattered by the air, and blue light is scattered the most.
How do I reverse a string in Python? Use slicing with a step of minus one: text[::-1].
"I don't know," he said, "but I'll find out." She smiled and said, "We'll see."
It's a small world, isn't it? They're here, we've seen them, and you'll meet them soon.
The system prompt says: You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
The user writes a message, the assistant or the model replies, and the system sets the rules.
Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.
system
user
Can you explain what this vector represents?
assistant
model
user
Please summarise the following text in one sentence.
assistant
model
The café served crêpes and a naïve little wine that nobody at the table really enjoyed.
"""


def build_toy_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A deterministic toy fast tokenizer for ``family`` ("qwen2", "llama" or "gemma3")."""
    spec = _family_spec(family)
    backend = _train_byte_level_bpe(spec)
    backend = _with_marker_merges(backend, spec["markers"])
    _add_specials(backend, spec)
    bos = spec["roles"]["bos_token"]
    backend.post_processor = _post_processor(backend, bos)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=spec["template"],
        model_max_length=8192,
        padding_side="right",
        **{role: token for role, token in spec["roles"].items() if token is not None},
    )


def save_toy_tokenizer(family: str, directory: str | Path) -> Path:
    """Write the toy tokenizer of ``family`` to ``directory`` (loadable with AutoTokenizer).

    ``tokenizer_class`` is rewritten to the generic ``PreTrainedTokenizerFast`` (transformers 5
    writes its new name ``TokenizersBackend``, which 4.x cannot resolve).
    """
    directory = Path(directory)
    build_toy_tokenizer(family).save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return directory


def _family_spec(family: str) -> dict:
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown toy tokenizer family {family!r}; expected one of {FAMILIES}")
    return _FAMILY_SPECS[family]


def _train_byte_level_bpe(spec: dict) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["bpe_size"],
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=spec["leading"],
    )
    backend.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return backend


def _with_marker_merges(backend: Tokenizer, code_points: list[int]) -> Tokenizer:
    """Append BPE merges that make each code point a single token (lowest merge priority)."""
    state = json.loads(backend.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges: list = state["model"]["merges"]
    for code_point in code_points:
        pieces = _byte_level_chars(chr(code_point))
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in vocab:
                merges.append([merged, piece])
                vocab[merged + piece] = len(vocab)
            merged += piece
    return Tokenizer.from_str(json.dumps(state))


def _byte_level_chars(text: str) -> list[str]:
    """The byte-level BPE alphabet symbols of ``text``'s UTF-8 bytes (GPT-2's byte→char map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    byte_to_char = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in byte_to_char)
    byte_to_char.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return [byte_to_char[b] for b in text.encode("utf-8")]


def _add_specials(backend: Tokenizer, spec: dict) -> None:
    backend.add_special_tokens(spec["trailing"])
    n_reserved = VOCAB_SIZE - backend.get_vocab_size(with_added_tokens=True)
    if n_reserved < 0:
        raise RuntimeError(f"toy vocabulary overflows VOCAB_SIZE={VOCAB_SIZE} by {-n_reserved}")
    backend.add_special_tokens([spec["reserved"].format(i) for i in range(n_reserved)])


def _post_processor(backend: Tokenizer, bos: str | None) -> processors.PostProcessor:
    """ByteLevel offsets, plus a BOS in front of every encoded sequence where the family has one."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None:
        return byte_level
    prepend_bos = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos}:1 $B:1",
        special_tokens=[(bos, backend.token_to_id(bos))],
    )
    return processors.Sequence([byte_level, prepend_bos])
