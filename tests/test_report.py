"""The end-of-run tables: methods, group "all", the best method, fine-tuning rows."""
from intrafusion.experiments.report import finetune_table, summary_table


def row(group, sparsity, method, accuracy, epoch=0, criterion="l1"):
    return dict(criterion=criterion, group=group, sparsity=sparsity, method=method,
                accuracy=accuracy, epoch=epoch)


def rows_with_all_and_finetuning():
    """Group 2 first, then "all", then group 1; four methods; fine-tuning for two of them."""
    rows = [row(-1, 0.0, "none", 0.9)]
    for group, sparsity, accs in [
        (2, 0.5, (0.60, 0.70, 0.65, 0.75)),
        ("all", 0.5, (0.20, 0.40, 0.40, 0.30)),
        (1, 0.7, (0.50, 0.55, 0.52, 0.58)),
        (1, 0.3, (0.80, 0.85, 0.82, 0.86)),
    ]:
        for method, acc in zip(("default", "intra_fusion", "default_repair", "intra_fusion_repair"),
                               accs):
            rows.append(row(group, sparsity, method, acc))
        for epoch in (1, 2):
            rows.append(row(group, sparsity, "default+ft", 0.8 + epoch / 100, epoch))
            rows.append(row(group, sparsity, "intra_fusion+ft", 0.85 + epoch / 100, epoch))
    rows.append(row(1, 0.3, "default", 0.1, criterion="lamp"))
    return rows


def test_summary_table_with_group_all_and_the_best_method():
    assert summary_table(rows_with_all_and_finetuning(), "l1") == "\n".join([
        "l1: unpruned 90.00%",
        "group  sparsity  default  intra_fusion  default_repair  intra_fusion_repair     gain  best",
        "    2      0.50   60.00%        70.00%          65.00%               75.00%   +10.00  intra_fusion_repair",
        "  all      0.50   20.00%        40.00%          40.00%               30.00%   +20.00  intra_fusion=default_repair",
        "    1      0.30   80.00%        85.00%          82.00%               86.00%    +5.00  intra_fusion_repair",
        "    1      0.70   50.00%        55.00%          52.00%               58.00%    +5.00  intra_fusion_repair",
    ])


def test_summary_table_without_gain_keeps_best_and_marks_missing_cells():
    rows = [row(-1, 0.0, "none", 0.9), row(1, 0.3, "default", 0.5),
            row(1, 0.3, "default_repair", 0.6), row(1, 0.3, "intra_fusion_varfix", 0.55),
            row("all", 0.3, "default", 0.2), row("all", 0.3, "default_repair", 0.1)]
    assert summary_table(rows, "l1").splitlines()[1:] == [
        "group  sparsity  default  default_repair  intra_fusion_varfix  best",
        "    1      0.30   50.00%          60.00%               55.00%  default_repair",
        "  all      0.30   20.00%          10.00%                    -  default",
    ]


def test_summary_table_of_two_methods_has_no_best_column():
    rows = [r for r in rows_with_all_and_finetuning() if r["method"] in ("default", "intra_fusion")]
    assert summary_table(rows, "l1").splitlines()[1:3] == [
        "group  sparsity  default  intra_fusion     gain",
        "    2      0.50   60.00%        70.00%   +10.00",
    ]
    assert summary_table(rows, "lamp") == "\n".join([
        "lamp", "group  sparsity  default", "    1      0.30   10.00%"])


def test_finetune_table_shows_epoch_zero_and_every_epoch():
    rows = [r for r in rows_with_all_and_finetuning()
            if not (r["group"] == 1 and r["sparsity"] == 0.7 and r["epoch"] == 2
                    and r["method"] == "default+ft")]
    assert finetune_table(rows, "l1") == "\n".join([
        "l1 fine-tuning: unpruned 90.00%",
        "group  sparsity  method        epoch 0  epoch 1  epoch 2",
        "    2      0.50  default        60.00%   81.00%   82.00%",
        "    2      0.50  intra_fusion   70.00%   86.00%   87.00%",
        "  all      0.50  default        20.00%   81.00%   82.00%",
        "  all      0.50  intra_fusion   40.00%   86.00%   87.00%",
        "    1      0.30  default        80.00%   81.00%   82.00%",
        "    1      0.30  intra_fusion   85.00%   86.00%   87.00%",
        "    1      0.70  default        50.00%   81.00%        -",
        "    1      0.70  intra_fusion   55.00%   86.00%   87.00%",
    ])


def test_finetune_table_is_none_without_finetuning_rows():
    rows = rows_with_all_and_finetuning()
    assert finetune_table(rows, "lamp") is None
    assert finetune_table([r for r in rows if "+ft" not in r["method"]], "l1") is None
