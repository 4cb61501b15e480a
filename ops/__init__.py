"""Operations: the local cluster runner (python -m ops.cluster) and system set-up."""
