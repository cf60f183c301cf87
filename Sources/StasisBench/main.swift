StasisBench.main()
