"""Attribution methods: the contract every method plugin honours, and the built-in ones."""
