"""TokenTaggingData: CoNLL, JSON lines and Hugging Face dataset sentences, the tag list, sub-token alignment,
batches, the on-disk token cache and one-line errors."""

from __future__ import annotations

import json
import logging

import pytest

from finetune.data.tagging import TokenTaggingData
from finetune.data.word_tokens import IGNORE
from finetune.errors import RecipeError
from tests.helpers.tagging import save_byte_level_tokenizer, save_tagger_bert, write_conll

SENTENCES = [
    (["anna", "visited", "paris", "city"], ["B-PER", "O", "B-LOC", "I-LOC"]),
    (["bob", "likes", "berlin"], ["B-PER", "O", "B-LOC"]),
    (["the", "city"], ["O", "O"]),
]


@pytest.fixture(scope="module")
def wordpiece_bert(tmp_path_factory) -> str:
    """A tiny BERT whose tokenizer splits ``annas``, ``parisville`` and ``visiting`` into two sub-tokens."""
    return str(save_tagger_bert(tmp_path_factory.mktemp("tagger-bert")))


def sentences(data: TokenTaggingData, split: str) -> list[tuple[list[str], list[str] | None]]:
    rows = data.table(split)
    tags = rows["tags"] if "tags" in rows.column_names else [None] * len(rows)
    return list(zip(rows["tokens"], tags))


def first_batch(data: TokenTaggingData, stage: str = "fit") -> dict:
    data.setup(stage)
    return next(iter(data.predict_dataloader() if stage == "predict" else data.train_dataloader()))


def test_conll_files_give_sentences_with_the_last_column_as_tag(tmp_path, wordpiece_bert):
    path = tmp_path / "train.conll"
    lines = ["-DOCSTART- -X- -X- O", "", "anna NNP B-NP B-PER", "visited VBD B-VP O", "", "", "-DOCSTART- O"]
    lines += ["bob NNP B-NP B-PER", "likes VBZ B-VP O", "berlin NNP B-NP B-LOC"]  # no newline at the end
    path.write_text("\n".join(lines))
    data = TokenTaggingData(train=str(path), backbone=wordpiece_bert, val_fraction=0)
    assert sentences(data, "train") == [
        (["anna", "visited"], ["B-PER", "O"]),
        (["bob", "likes", "berlin"], ["B-PER", "O", "B-LOC"]),
    ]
    assert data.table("val") is None


def test_predict_files_may_hold_tokens_alone(tmp_path, wordpiece_bert):
    path = write_conll(tmp_path / "new.txt", [(words, None) for words, _ in SENTENCES[:2]])
    data = TokenTaggingData(predict=str(path), backbone=wordpiece_bert, labels=["O", "B-PER"])
    assert sentences(data, "predict") == [(SENTENCES[0][0], None), (SENTENCES[1][0], None)]
    assert "labels" not in first_batch(data, "predict")


def test_tags_are_O_first_then_sorted_unless_listed(tmp_path, wordpiece_bert):
    path = write_conll(tmp_path / "train.iob", SENTENCES)
    assert TokenTaggingData(train=str(path), backbone=wordpiece_bert).labels == [
        "O",
        "B-LOC",
        "B-PER",
        "I-LOC",
    ]
    listed = ["O", "B-PER", "B-LOC", "I-LOC", "I-PER"]
    assert TokenTaggingData(train=str(path), backbone=wordpiece_bert, labels=listed).labels == listed
    with pytest.raises(RecipeError, match=r"^data\.labels: train tags \['I-LOC'\] are not in the tag list"):
        _ = TokenTaggingData(train=str(path), backbone=wordpiece_bert, labels=["O", "B-PER", "B-LOC"]).labels


def test_val_tags_unknown_to_train_name_the_split(tmp_path, wordpiece_bert):
    train = write_conll(tmp_path / "train.conll", SENTENCES)
    val = write_conll(tmp_path / "val.conll", [(["bob"], ["B-ORG"])])
    data = TokenTaggingData(train=str(train), val=str(val), backbone=wordpiece_bert)
    with pytest.raises(RecipeError, match=r"^data\.val: tags \['B-ORG'\] do not occur in train"):
        data.setup("fit")


def test_json_lines_with_named_columns(tmp_path, wordpiece_bert):
    path = tmp_path / "train.jsonl"
    rows = [{"id": i, "words": words, "ner": tags} for i, (words, tags) in enumerate(SENTENCES)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = TokenTaggingData(
        train=str(path), backbone=wordpiece_bert, tokens_column="words", tags_column="ner", val_fraction=0
    )
    assert sentences(data, "train") == SENTENCES
    assert data.split_rows("train").rows.column_names == ["tokens", "tags"]


def test_json_lines_with_a_tag_missing_or_no_list_name_the_row(tmp_path, wordpiece_bert):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(RecipeError, match=r"^data\.train: train\.jsonl row 0 has 2 words but 1 tags"):
        TokenTaggingData(train=str(path), backbone=wordpiece_bert).split_rows("train")
    path.write_text(json.dumps({"tokens": "a b", "tags": ["O", "O"]}) + "\n")
    with pytest.raises(RecipeError, match=r"^data\.train: train\.jsonl row 0: 'tokens' is 'a b', not a list"):
        TokenTaggingData(train=str(path), backbone=wordpiece_bert).split_rows("train")
    with pytest.raises(RecipeError, match=r"^data\.tokens_column: column 'words' not in train\.jsonl"):
        TokenTaggingData(train=str(path), backbone=wordpiece_bert, tokens_column="words").split_rows("train")


def test_dataset_class_label_ids_are_read_as_their_names(tmp_path, wordpiece_bert):
    import datasets

    names = ["O", "B-PER", "B-LOC", "I-LOC"]
    features = datasets.Features(
        {
            "words": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )
    folder = tmp_path / "corpus"
    for split, part in (("train", SENTENCES), ("validation", SENTENCES[:1])):
        rows = {
            "words": [w for w, _ in part],
            "ner_tags": [[names.index(t) for t in tags] for _, tags in part],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    data = TokenTaggingData(
        dataset=str(folder), backbone=wordpiece_bert, tokens_column="words", tags_column="ner_tags"
    )
    assert sentences(data, "train") == SENTENCES
    assert sentences(data, "val") == SENTENCES[:1]
    assert data.labels == ["O", "B-LOC", "B-PER", "I-LOC"]


def test_first_sub_token_of_each_word_carries_its_tag(tmp_path, wordpiece_bert):
    from transformers import AutoTokenizer

    words, tags = ["annas", "visiting", "parisville", "city"], ["B-PER", "O", "B-LOC", "I-LOC"]
    path = write_conll(tmp_path / "train.conll", [(words, tags)])
    data = TokenTaggingData(
        train=str(path), predict=str(path), backbone=wordpiece_bert, val_fraction=0, max_length=16
    )
    batch = first_batch(data)
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_bert)
    pieces = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert pieces == ["[CLS]", "anna", "##s", "visit", "##ing", "paris", "##ville", "city", "[SEP]"]
    tag = {name: i for i, name in enumerate(data.labels)}
    expected = [IGNORE, tag["B-PER"], IGNORE, tag["O"], IGNORE, tag["B-LOC"], IGNORE, tag["I-LOC"], IGNORE]
    assert batch["labels"][0].tolist() == expected
    assert "word_ids" not in batch  # training batches hold model inputs, labels and index only
    predict = first_batch(data, "predict")
    assert predict["word_ids"][0].tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, -1] + [-1] * 7  # max_length wide


def test_byte_level_bpe_tokenises_each_word_as_in_running_text(tmp_path):
    from transformers import AutoTokenizer

    backbone = save_byte_level_tokenizer(tmp_path / "roberta")
    path = write_conll(tmp_path / "train.conll", [(["anna", "visited", "paris"], ["B-PER", "O", "B-LOC"])])
    data = TokenTaggingData(train=str(path), backbone=str(backbone), val_fraction=0)
    batch = first_batch(data)
    pieces = AutoTokenizer.from_pretrained(backbone).convert_ids_to_tokens(batch["input_ids"][0])
    firsts = [piece for piece, label in zip(pieces, batch["labels"][0].tolist()) if label != IGNORE]
    # Each word starts with the space RoBERTa sees before a word mid-sentence ("Ġ").
    assert len(firsts) == 3 and all(piece.startswith("Ġ") for piece in firsts), pieces


def test_batches_pad_labels_with_minus_100_and_keep_the_row_index(tmp_path, wordpiece_bert):
    path = write_conll(tmp_path / "train.conll", SENTENCES)
    data = TokenTaggingData(train=str(path), predict=str(path), backbone=wordpiece_bert, val_fraction=0)
    data.setup("predict")
    data.setup("fit")
    batch = next(iter(data.eval_loader(data.split_dataset("train"))))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 6)
    assert batch["attention_mask"].sum(1).tolist() == [6, 5, 4]
    assert batch["labels"][2, 3:].tolist() == [IGNORE] * 3
    assert batch["index"].tolist() == [0, 1, 2]
    widths = {tuple(b["word_ids"].shape[1:]) for b in data.predict_dataloader()}
    assert widths == {(data.max_length,)}


def test_words_cut_by_max_length_are_counted_in_a_warning(tmp_path, wordpiece_bert, caplog):
    path = write_conll(tmp_path / "train.conll", SENTENCES)
    data = TokenTaggingData(train=str(path), backbone=wordpiece_bert, val_fraction=0, max_length=4)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        batch = first_batch(data)
    assert batch["input_ids"].shape[1] == 4
    # [CLS] + 2 words + [SEP]: 2 of the first sentence's 4 words are lost, 1 of the second's 3.
    assert "train: 3 words of 2 sentences got no token" in caplog.text


def test_hold_out_and_limit_sample_sentences(tmp_path, wordpiece_bert):
    many = [([f"w{i}"], ["O" if i % 2 else "B-PER"]) for i in range(20)]
    path = write_conll(tmp_path / "train.conll", many)
    data = TokenTaggingData(
        train=str(path), backbone=wordpiece_bert, limit=10, val_fraction=0.2, test_fraction=0.1
    )
    sizes = [len(data.split_rows(split)) for split in ("train", "val", "test")]
    assert sizes == [7, 2, 1]
    again = TokenTaggingData(
        train=str(path), backbone=wordpiece_bert, limit=10, val_fraction=0.2, test_fraction=0.1
    )
    assert sentences(again, "val") == sentences(data, "val")


def test_tokens_are_cached_by_rows_tokenizer_and_settings(tmp_path, wordpiece_bert):
    path = write_conll(tmp_path / "train.conll", SENTENCES)

    def token_file(**settings) -> str:
        data = TokenTaggingData(train=str(path), backbone=wordpiece_bert, val_fraction=0, **settings)
        data.setup("fit")
        return data.split_dataset("train").tokens.cache_files[0]["filename"]

    assert token_file() == token_file()
    assert token_file(max_length=8) != token_file()


def test_the_tag_list_travels_in_checkpoints_and_labels_json(tmp_path, wordpiece_bert):
    path = write_conll(tmp_path / "train.conll", SENTENCES)
    data = TokenTaggingData(train=str(path), backbone=wordpiece_bert)
    state = data.state_dict()
    restored = TokenTaggingData(backbone=wordpiece_bert)
    restored.load_state_dict(state)
    assert restored.labels == data.labels
    saved = data.save_labels(tmp_path / "run")
    assert json.loads(saved.read_text()) == data.labels
    other = TokenTaggingData(
        train=str(path), backbone=wordpiece_bert, labels=["O", "B-PER", "B-LOC", "I-LOC"]
    )
    _ = other.labels
    with pytest.raises(RecipeError, match=r"^data\.labels: the checkpoint has tags"):
        other.load_state_dict(state)


def test_plan_lines_count_sentences_and_tags(tmp_path, wordpiece_bert):
    path = write_conll(tmp_path / "train.conll", SENTENCES * 4)
    lines = TokenTaggingData(train=str(path), backbone=wordpiece_bert, val_fraction=0.25).describe_data()
    assert "sentences: train 9, val 3" in lines and "tags: O, B-LOC, B-PER, I-LOC" in lines


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("anna B-PER\nvisited\n", r"train\.conll line 2 \('visited'\) has no tag"),
        ("anna\nvisited O\n", r"train\.conll line 1 has no tag but line 2 has one"),
        ("\n\n-DOCSTART- -X- O\n\n", r"train\.conll has no sentences"),
        ("", r"train\.conll has no sentences"),
    ],
)
def test_bad_conll_files_name_the_key_and_line(tmp_path, wordpiece_bert, content, message):
    path = tmp_path / "train.conll"
    path.write_text(content)
    with pytest.raises(RecipeError, match=rf"^data\.train: {message}"):
        TokenTaggingData(train=str(path), backbone=wordpiece_bert).setup("fit")


def test_bad_input_names_its_key(tmp_path, wordpiece_bert, tiny_timm_checkpoint):
    with pytest.raises(RecipeError, match=r"^data\.train: .*missing\.conll does not exist"):
        TokenTaggingData(train=str(tmp_path / "missing.conll"), backbone=wordpiece_bert).setup("fit")
    table = tmp_path / "train.csv"
    table.write_text("tokens,tags\na,O\n")
    with pytest.raises(RecipeError, match=r"^data\.train: cannot read train\.csv: unknown extension '\.csv'"):
        TokenTaggingData(train=str(table), backbone=wordpiece_bert).setup("fit")
    untagged = write_conll(tmp_path / "untagged.conll", [(["anna", "bob"], None)])
    with pytest.raises(RecipeError, match=r"^data\.train: untagged\.conll has no tags"):
        TokenTaggingData(train=str(untagged), backbone=wordpiece_bert).setup("fit")
    one_tag = write_conll(tmp_path / "o.conll", [(["anna", "bob"], ["O", "O"])] * 2)
    with pytest.raises(RecipeError, match=r"^data\.train: every train token has the tag 'O'"):
        _ = TokenTaggingData(train=str(one_tag), backbone=wordpiece_bert).labels
    timm = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    train = write_conll(tmp_path / "train.conll", SENTENCES)
    with pytest.raises(RecipeError, match=r"^model\.backbone: timm:test_vit is not a Hugging Face model"):
        TokenTaggingData(train=str(train), backbone=timm).setup("fit")
    with pytest.raises(RecipeError, match=r"^data\.max_length: must be 3 or more"):
        TokenTaggingData(max_length=2)
