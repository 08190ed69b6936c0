"""The one exception the data layer raises for bad input, with the dataset, row and column it is about."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names where (dataset, row, column) and what was expected.

    Args:
        dataset: The dataset's name or path, as the user gave it.
        message: What is wrong and what was expected.
        row: The row index, when the problem is in one row.
        column: The column name, when the problem is in one column.
    """

    def __init__(self, dataset: str, message: str, *, row: int | None = None, column: str | None = None) -> None:
        where = [f"dataset {dataset!r}"]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.dataset, self.row, self.column = dataset, row, column
