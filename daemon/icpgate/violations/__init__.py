"""The violation log: the SQLite store, its writer, DNS confirmation and the exports."""
