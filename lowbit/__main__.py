from lowbit.compiler.cli import main

raise SystemExit(main())
