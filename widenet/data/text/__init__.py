"""The text side's data: tokenizers, pretraining corpora and fine-tuning tasks.

Pretraining (MLM + sentence order):

1. ``documents``: :func:`~.documents.iter_documents` reads documents from text,
   JSONL and GCIDE files (``gcide``) and folders of them;
2. ``corpus``: :func:`~.corpus.load_pretrain_corpus` splits them into sentences
   (``sentences``), tokenizes them (``tokenizer``) into a compact, cached
   :class:`~.corpus.PretrainCorpus`;
3. ``pretraining``: :func:`~.pretraining.make_sop_examples` packs sentence
   pairs with sentence-order labels and :func:`~.pretraining.mask_tokens`
   masks a batch.

Fine-tuning: ``classification`` (GLUE-style files), ``squad`` (span QA) and
``squad_metrics`` (EM/F1), sharing ``task_common``; ``hub`` fetches either from
the Hugging Face hub; ``gcide_tasks`` builds part-of-speech and subject-field tasks from GCIDE.

Import the submodules directly; this package imports nothing, so loading one
reader does not load the tokenizer library.
"""
