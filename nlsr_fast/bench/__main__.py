from nlsr_fast.bench import main

raise SystemExit(main())
